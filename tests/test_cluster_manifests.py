"""The KubeRay manifests are valid Kubernetes and complete (issue 22 item 4), and the VM
launcher boots a GPU image the image's CUDA build runs on (item 5).

Every YAML document of cluster/kuberay-*.yaml: core kinds validated against Kubernetes'
own schemas (kubernetes-validate, strict: an unknown or misspelt field fails), the KubeRay
kinds checked field by field with each pod template validated as a PodTemplate. Then what a
16-GPU run needs: one worker pod per node holding its 8 GPUs, /dev/shm in memory sized
for NCCL and Ray's object store, claims and Secrets that exist, the shared volume writable
by the `ray` user, MLflow behind authentication reachable only by the Ray pods, and the
port-forward commands in docs/CLUSTER.md.
"""

from __future__ import annotations

import re

import kubernetes_validate.utils as kv
import pytest
from cluster_sources import (
    CLUSTER,
    KUBE_FILES,
    RAY_KINDS,
    ROOT,
    all_kube_docs,
    docs,
    launcher,
    pod_templates,
    ray_cluster_specs,
    ray_pod_templates,
)

K8S = kv.latest_version()  # the newest schemas kubernetes-validate ships
GIB = 1024**3
SHARED_DIRS = ("/mnt/shared/lethe-runs", "/mnt/shared/huggingface", "/mnt/shared/mlflow")


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def _ray_version() -> str:
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    image = re.search(r"rayproject/ray:([\d.]+)-py311-(cu\d+)", (CLUSTER / "Dockerfile").read_text())
    assert image.group(1) == pin, "the image's Ray differs from the pinned one"
    return pin


@pytest.mark.parametrize(("name", "index"), [(n, i) for n in KUBE_FILES for i in range(len(docs(n)))])
def test_every_document_is_valid_kubernetes(name, index):
    doc = docs(name)[index]
    assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    if doc["kind"] in RAY_KINDS:
        assert doc["apiVersion"] == "ray.io/v1"
        with pytest.raises(kv.SchemaNotFoundError):  # a CRD: checked by the test below
            kv.validate(doc, K8S, strict=True)
    else:
        kv.validate(doc, K8S, strict=True)


def test_ray_kinds_have_their_required_fields_and_valid_pod_templates():
    version = _ray_version()
    for d in (d for _, d in all_kube_docs() if d["kind"] in RAY_KINDS):
        if d["kind"] == "RayJob":
            assert d["spec"]["entrypoint"].startswith("python -m jobs.")
            assert d["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    for name in KUBE_FILES:
        for spec in ray_cluster_specs(name):
            assert spec["rayVersion"] == version, name
            assert "template" in spec["headGroupSpec"] and spec["workerGroupSpecs"]
            for group in spec["workerGroupSpecs"]:
                assert group["groupName"] and "rayStartParams" in group
                assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", 10**6)
    for name, group, template in ray_pod_templates():
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate",
                     "metadata": {"name": f"{name}-{group}".replace(".", "-")},
                     "template": template}, K8S, strict=True)


def test_a_kubernetes_validation_can_fail():
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "a", "imagee": "x"}]}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S, strict=True)


def test_every_container_runs_the_lethe_image_with_resources():
    image = launcher()["docker"]["image"]
    for name, group, template in pod_templates():
        spec = template["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["image"] == image, (name, group, c["name"])
            limits = c["resources"]["limits"]
            assert "cpu" in limits and "memory" in limits, (name, group, c["name"])


def test_gpu_workers_are_one_pod_per_node_with_all_its_gpus():
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for spec in ray_cluster_specs(name):
            (group,) = spec["workerGroupSpecs"]
            pod = group["template"]["spec"]
            (worker,) = pod["containers"]
            res = worker["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 8
            assert group["replicas"] * 8 == 16, "the default is 2 nodes x 8 GPUs"
            assert res["limits"] == res["requests"], "Guaranteed QoS: no eviction mid-run"
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
            assert shm["medium"] == "Memory"
            assert {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}["/dev/shm"] == "dshm"
            shm_bytes = _quantity(shm["sizeLimit"])
            store = float(group["rayStartParams"]["object-store-memory"])
            # Ray's store lives in /dev/shm; what it leaves is NCCL's shared-memory transport.
            assert shm_bytes - store >= 64 * GIB, (name, shm_bytes / GIB, store / GIB)
            assert _quantity(res["limits"]["memory"]) >= shm_bytes + 512 * GIB
            assert float(res["limits"]["cpu"]) <= 96  # fits every 8 x H100 node type
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        for head in (s["headGroupSpec"] for s in ray_cluster_specs(name)):
            assert head["rayStartParams"]["num-cpus"] == "0"


def test_claims_and_secrets_referenced_exist():
    claims = {d["metadata"]["name"]: d for _, d in all_kube_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert claims["lethe-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Secrets: created by a documented `kubectl create secret generic` (values never in a
    # file), or generated by KubeRay for token authentication.
    created: dict[str, set[str]] = {}
    for name in KUBE_FILES:
        text = (CLUSTER / name).read_text()
        for m in re.finditer(r"kubectl create secret generic ([\w-]+)((?:[^\n]*\\\n)*[^\n]*)", text):
            created.setdefault(m.group(1), set()).update(re.findall(r"--from-literal=([\w-]+)=", m.group(2)))
    assert created.get("lethe-mlflow-auth") == {"username", "password", "flask-secret-key"}
    for name, group, template in pod_templates():
        spec = template["spec"]
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (name, group)
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in created.get(ref["name"], set()), (name, group, ref)
            for ref in (s["secretRef"] for s in c.get("envFrom", []) if "secretRef" in s):
                assert ref["name"] in created, (name, group, ref)


def test_the_shared_volume_is_made_writable_for_the_ray_user():
    run_dirs = {re.search(r"^run_dir: (\S+)", p.read_text(), re.M).group(1)
                for p in (ROOT / "configs/paper").glob("*.yaml")
                if not p.name.startswith("smoke")}  # smoke-1gpu: one machine, run_dir runs
    assert run_dirs and run_dirs <= set(SHARED_DIRS), run_dirs
    for name, group, template in pod_templates():
        spec = template["spec"]
        if not any(v.get("persistentVolumeClaim") for v in spec.get("volumes", [])):
            continue
        assert spec["securityContext"]["fsGroup"] == 100, (name, group)
        init = {c["name"]: c for c in spec["initContainers"]}
        fix, check = init["shared-dirs"], init["shared-dirs-check"]
        assert fix["securityContext"]["runAsUser"] == 0 and "chown 1000:100" in fix["args"][0]
        uid = check.get("securityContext", {}).get("runAsUser", spec["securityContext"].get("runAsUser"))
        assert uid == 1000 and "exit 1" in check["args"][0]
        for d in SHARED_DIRS:
            assert d in fix["args"][0] and d in check["args"][0], (name, group, d)


def test_mlflow_runs_with_authentication_and_only_ray_pods_reach_it():
    shared = docs("kuberay-shared.yaml")
    deploy = next(d for d in shared if d["kind"] == "Deployment")
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    args = server["args"]
    assert server["command"] == ["mlflow", "server"] and "--app-name=basic-auth" in args
    assert "--serve-artifacts" in args
    for flag in ("--backend-store-uri=sqlite:////mnt/shared/", "--artifacts-destination=/mnt/shared/"):
        assert any(a.startswith(flag) for a in args), flag
    env = {e["name"]: e for e in server["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], key
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert ini == "/home/ray/lethe/cluster/mlflow_basic_auth.ini"  # cluster/ is in the image
    assert (CLUSTER / "mlflow_basic_auth.ini").is_file()

    labels = deploy["spec"]["template"]["metadata"]["labels"]
    (policy,) = [d for d in shared if d["kind"] == "NetworkPolicy"
                 and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespace or IP block may reach MLflow"
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert expr["operator"] == "Exists" and [p["port"] for p in rule["ports"]] == [5000]
    for name, group, template in ray_pod_templates():
        assert expr["key"] in template["metadata"]["labels"], (name, group)


def test_cluster_doc_has_the_port_forward_commands():
    text = (ROOT / "docs/CLUSTER.md").read_text()
    assert re.search(r"kubectl port-forward svc/\S*head-svc 8265:8265", text)
    assert "kubectl port-forward svc/lethe-mlflow 5000:5000" in text


# ----------------------------------------------------------------------------- launcher


def test_launcher_boots_a_gpu_image_whose_driver_runs_the_cuda_build():
    cfg = launcher()
    text = (CLUSTER / "aws-cluster.yaml").read_text()
    param = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    for node_type, spec in cfg["available_node_types"].items():
        image = spec["node_config"]["ImageId"]
        assert image == f"resolve:ssm:{param}" or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), node_type
    # How to look it up (and pin it) per region, in the file.
    assert "aws ssm get-parameter --region" in text and param in text
    assert "aws ec2 describe-images" in text and "Deep Learning Base OSS Nvidia Driver GPU AMI" in text
    # The image's CUDA build and the driver the AMI must have agree with the Dockerfile.
    docker = (CLUSTER / "Dockerfile").read_text()
    assert "ARG TORCH_CUDA=cu128" in docker and "rayproject/ray:2.60.0-py311-cu128" in docker
    assert "driver >= 570.26" in docker and "driver >= 570.26" in text
    assert cfg["docker"]["image"] == next(iter(d for _, d in all_kube_docs() if d["kind"] == "RayCluster")
                                          )["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
