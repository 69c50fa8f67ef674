"""What every shipped cluster file puts in a job's environment (issue 22 items 3 and 5).

Parsed from the files as shipped: cluster/runtime_env.yaml, cluster/runtime_env.local.yaml,
the RayJob's runtimeEnvYAML, every container env of the RayCluster / RayJob / MLflow
Deployment, the launcher's docker `-e` options and `ray start` environment, the Dockerfile's
ENV, and the text of every file. Asserted:
  - no offline switch (HF_*_OFFLINE / TRANSFORMERS_OFFLINE on) anywhere: offline defaults
    belong to the embedded local instance (orchestrator/embedded.py);
  - HF_HOME on the shared volume on every Ray node (KubeRay pods, launcher containers), and
    in no runtime env (a place, not a job, decides it);
  - the quiet-log switches of a local run off a terminal (logs.QUIET_ENV) and their hook in
    every job runtime env;
  - where the MLflow URI comes from: never a runtime env; KubeRay pods name the shipped
    MLflow Service with credentials from the Secret the server is bootstrapped with; launcher
    nodes name the head's server; a config's tracking.tracking_uri wins over them;
  - cluster/runtime_env.yaml sets exactly the listed variables, none naming a place, so it
    runs unchanged on a local multi-node cluster.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

import pytest
from cluster_sources import (
    CLUSTER,
    container_env,
    dockerfile_env,
    docs,
    job_runtime_envs,
    launcher,
    launcher_bind_targets,
    launcher_docker_env,
    ray_pod_templates,
    ray_start_env,
    shipped_files,
)

from orchestrator.logs import QUIET_ENV

OFFLINE_KEY = re.compile(r"^(HF_\w*_OFFLINE|TRANSFORMERS_OFFLINE)$")
ON = {"1", "true", "yes", "on"}
# What cluster/runtime_env.yaml sets, and nothing else (the rehearsal of the paper run on a
# local two-node cluster submits it as shipped).
RUNTIME_ENV_VARS = {**QUIET_ENV, "TOKENIZERS_PARALLELISM": "false",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_USAGE_STATS_ENABLED": "0",
                    "TORCH_EXTENSIONS_DIR": "/tmp/torch_extensions"}


def _shared_mounts(template: dict) -> dict[str, str]:
    """container name -> mount path of the volume backed by the lethe-shared claim."""
    spec = template["spec"]
    shared = {v["name"] for v in spec.get("volumes", [])
              if v.get("persistentVolumeClaim", {}).get("claimName") == "lethe-shared"}
    return {c["name"]: m["mountPath"] for c in spec["containers"]
            for m in c.get("volumeMounts", []) if m["name"] in shared}


def _every_env() -> dict[str, dict[str, str]]:
    """source -> environment, over every place a shipped file sets variables."""
    envs = {name: {k: str(v) for k, v in env.get("env_vars", {}).items()}
            for name, env in job_runtime_envs().items()}
    for name, group, template in ray_pod_templates():
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            envs[f"{name}:{group}:{c['name']}"] = container_env(c)
    for d in docs("kuberay-shared.yaml"):
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                envs[f"kuberay-shared.yaml:{c['name']}"] = container_env(c)
    envs["aws-cluster.yaml:docker"] = launcher_docker_env()
    envs["aws-cluster.yaml:head"] = ray_start_env("head_start_ray_commands")
    envs["aws-cluster.yaml:worker"] = ray_start_env("worker_start_ray_commands")
    envs["Dockerfile"] = dockerfile_env()
    return envs


def test_the_cluster_folder_holds_the_expected_files():
    shipped_files()  # asserts the set; every other test reads from these


def test_no_shipped_file_turns_an_offline_switch_on():
    for source, env in _every_env().items():
        on = {k: v for k, v in env.items() if OFFLINE_KEY.match(k) and v.strip().lower() in ON}
        assert not on, f"{source} sets {on}: offline defaults are for the embedded instance only"
    # Also in any text (launcher commands, comments that show a command to copy).
    for name, path in shipped_files().items():
        text = path.read_text()
        hits = re.findall(r"(?:HF_\w*_OFFLINE|TRANSFORMERS_OFFLINE)\W{0,3}[:=]\s*[\"']?(?:1|true|on)\b",
                          text, flags=re.IGNORECASE)
        allowed = name == "runtime_env.local.yaml"  # its comment shows an offline `ray start`
        assert allowed or not hits, f"{name}: {hits}"


def test_hf_home_is_on_the_shared_volume_on_every_ray_node():
    for name, group, template in ray_pod_templates():
        mounts = _shared_mounts(template)
        for c in template["spec"]["containers"]:
            home = container_env(c).get("HF_HOME")
            assert home, f"{name} {group} {c['name']}: no HF_HOME (every pod would download again)"
            assert home.startswith(mounts[c["name"]].rstrip("/") + "/"), (name, group, home)
    home = launcher_docker_env().get("HF_HOME")
    assert home and any(home.startswith(t.rstrip("/") + "/") for t in launcher_bind_targets()), home
    # The folder exists and belongs to the ray user: the launcher's host step makes it.
    assert home in " ".join(launcher()["initialization_commands"])
    for name, env in job_runtime_envs().items():
        assert "HF_HOME" not in env.get("env_vars", {}), f"{name}: HF_HOME belongs to the nodes"


def test_job_runtime_envs_quiet_their_workers_like_a_local_run():
    """A job's log is a file, never a terminal: every job runtime env carries the switches
    `lethe run` sets off a terminal (logs.QUIET_ENV) and the hook that applies them."""
    for name, env in job_runtime_envs().items():
        assert env["worker_process_setup_hook"] == "orchestrator.logs.worker_setup", name
        assert {k: env["env_vars"].get(k) for k in QUIET_ENV} == QUIET_ENV, name


def test_runtime_env_yaml_sets_exactly_the_listed_place_free_variables():
    env = job_runtime_envs()["runtime_env.yaml"]["env_vars"]
    assert {k: str(v) for k, v in env.items()} == RUNTIME_ENV_VARS


# ----------------------------------------------------------------------------- MLflow URI


def _mlflow_service() -> tuple[str, int, dict]:
    """(Service name, port, the MLflow container) of cluster/kuberay-shared.yaml."""
    shared = docs("kuberay-shared.yaml")
    deploy = next(d for d in shared if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "lethe-mlflow")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    services = [d for d in shared if d["kind"] == "Service"
                and d["spec"]["selector"].items() <= labels.items()]
    assert len(services) == 1
    svc = services[0]
    (port,) = svc["spec"]["ports"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = named.get(port["targetPort"], port["targetPort"])
    assert f"--port={target}" in container["args"], "the Service does not reach the server's port"
    return svc["metadata"]["name"], port["port"], container


def test_runtime_envs_never_name_the_mlflow_server():
    for name, env in job_runtime_envs().items():
        assert "MLFLOW_TRACKING_URI" not in env.get("env_vars", {}), name


def test_kuberay_pods_log_to_the_shipped_mlflow_service_with_its_credentials():
    service, port, server = _mlflow_service()
    server_env = container_env(server)
    assert "--app-name=basic-auth" in server["args"]
    allowed = next(a for a in server["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    for name, group, template in ray_pod_templates():
        for c in template["spec"]["containers"]:
            env = container_env(c)
            uri = urlparse(env.get("MLFLOW_TRACKING_URI", ""))
            assert (uri.scheme, uri.hostname, uri.port) == ("http", service, port), (name, group)
            assert uri.netloc in allowed.split(","), f"the server refuses Host {uri.netloc}"
            # The job logs in as the account the server creates from the same Secret keys.
            assert env["MLFLOW_TRACKING_USERNAME"] == server_env["MLFLOW_AUTH_ADMIN_USERNAME"]
            assert env["MLFLOW_TRACKING_PASSWORD"] == server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
            assert env["MLFLOW_TRACKING_PASSWORD"].startswith("secret:")


def test_launcher_nodes_log_to_the_heads_mlflow_server():
    head = ray_start_env("head_start_ray_commands")["MLFLOW_TRACKING_URI"]
    worker = ray_start_env("worker_start_ray_commands")["MLFLOW_TRACKING_URI"]
    server = next(c for c in launcher()["head_start_ray_commands"] if "mlflow server" in c)
    port = int(re.search(r"--port[ =](\d+)", server).group(1))
    assert head == f"http://127.0.0.1:{port}" and worker == f"http://$RAY_HEAD_IP:{port}"
    assert "--app-name basic-auth" in server and "--serve-artifacts" in server
    assert "MLFLOW_AUTH_CONFIG_PATH=/home/ray/lethe/cluster/mlflow_basic_auth.ini" in server
    # The server's secrets come from a file copied from the submitting machine, never this one.
    assert "~/.lethe/mlflow-server.env" in launcher()["file_mounts"]
    assert not re.search(r"MLFLOW_AUTH_ADMIN_PASSWORD=\S", (CLUSTER / "aws-cluster.yaml").read_text()
                         .replace("MLFLOW_AUTH_ADMIN_PASSWORD=$(openssl", ""))


@pytest.mark.parametrize("override", [None, "http://mlflow.example:5000"])
def test_a_configs_tracking_uri_wins_over_the_nodes(monkeypatch, override, tmp_path):
    """The choice for VM clusters (docs/CLUSTER.md): the nodes' MLFLOW_TRACKING_URI is a
    default; `tracking.tracking_uri=...` on a job's entry point sends it elsewhere."""
    from orchestrator.config import load_config
    from orchestrator.tracking.uri import resolve_tracking_uri

    node_uri = "http://10.0.0.5:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", node_uri)
    overrides = [f"tracking.tracking_uri={override}"] if override else []
    cfg = load_config(CLUSTER.parent / "configs/paper/llama3.2-1b.yaml", overrides)
    assert resolve_tracking_uri(cfg.tracking, tmp_path) == (override or node_uri)


def test_the_shipped_basic_auth_settings_load_in_mlflow(monkeypatch):
    """MLflow reads cluster/mlflow_basic_auth.ini (as the image carries it): the user store on
    the shared volume, no password in the file."""
    from mlflow.server.auth.config import read_auth_config

    path = CLUSTER / "mlflow_basic_auth.ini"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    cfg = read_auth_config()
    assert cfg.database_uri == "sqlite:////mnt/shared/mlflow/basic_auth.db"
    assert cfg.admin_password is None
    assert "admin_password =" not in path.read_text().replace("# admin_password", "")
