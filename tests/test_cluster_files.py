"""The cluster files hold together without a cluster or `docker build`.

- every path the RayJob and the launcher YAML run (modules, configs, the files those configs
  name) exists and lies in what cluster/Dockerfile copies (minus its .dockerignore);
- the KubeRay manifests turn Ray token authentication on and carry a NetworkPolicy that
  admits only the cluster's own pods to the Ray ports;
- the launcher YAML mounts NFS on the host, uses no undefined variables, starts Ray with
  token auth and keeps the dashboard on 127.0.0.1;
- credentials travel from the submitting shell into the runtime env, by name in the output.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.pipeline.credentials import CREDENTIAL_VARS, credential_env, describe

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
# Variables the Ray cluster launcher defines for its commands.
LAUNCHER_VARS = {"RAY_HEAD_IP"}


# ----------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> tuple[str, list[tuple[str, str]]]:
    """(WORKDIR, [(source, destination)]) of cluster/Dockerfile's COPY instructions."""
    workdir, copies = "/", []
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        # Only single-line WORKDIR / COPY instructions matter here; RUN lines may continue.
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if parts[0].upper() == "WORKDIR":
            workdir = parts[1]
        elif parts[0].upper() == "COPY":
            args = [p for p in parts[1:] if not p.startswith("--")]
            for src in args[:-1]:
                copies.append((src.rstrip("/"), args[-1]))
    return workdir, copies


def _ignored(rel: str) -> bool:
    patterns = [p.strip() for p in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(pre, pat) or fnmatch.fnmatch(pre, pat.removeprefix("**/"))
               or fnmatch.fnmatch(parts[i], pat.removeprefix("**/"))
               for pat in patterns for i, pre in enumerate(prefixes))


def _in_image(rel: str) -> bool:
    """Whether repository path `rel` is copied into the image (by itself or a folder)."""
    _, copies = _dockerfile()
    return not _ignored(rel) and any(rel == src or rel.startswith(src + "/") for src, _ in copies)


def _module_file(module: str) -> str:
    path = module.replace(".", "/")
    return f"{path}.py" if (ROOT / f"{path}.py").exists() else f"{path}/__init__.py"


def _config_files(config_rel: str) -> list[str]:
    """Local files an experiment config makes the pipeline read, besides itself."""
    cfg = load_config(ROOT / config_rel)
    files = []
    if cfg.train.deepspeed:
        files.append(cfg.train.deepspeed)
    if cfg.evaluate.include_path:
        files.append(cfg.evaluate.include_path)
    return files


def _paths_run_by(text: str) -> set[str]:
    """Repository paths named by commands in a YAML's text (its launch comments included):
    `python -m` modules, and configs / cluster / jobs files."""
    found = {_module_file(m) for m in re.findall(r"python -m ([\w.]+)", text)}
    found |= set(re.findall(r"\b((?:configs|cluster|jobs|orchestrator)/[\w./-]+\.\w+)", text))
    for cfg in [p for p in list(found) if p.startswith("configs/") and p.endswith(".yaml")]:
        if "deepspeed" not in cfg:
            found |= set(_config_files(cfg))
    return found


def test_dockerfile_copies_code_and_configs():
    workdir, copies = _dockerfile()
    sources = {src for src, _ in copies}
    assert {"orchestrator", "jobs", "configs", "pyproject.toml"} <= sources
    assert workdir == "/home/ray/lethe"
    text = (CLUSTER / "Dockerfile").read_text()
    # torch pinned to a CUDA build, checked at build time, with the driver it needs stated.
    assert re.search(r'torch==\$\{TORCH_VERSION\}|torch==\d', text)
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert re.search(r"ARG TORCH_CUDA=cu\d{3}", text)
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert re.search(r"driver >= \d{3}", text)
    # deepspeed_setup resolves train.deepspeed against the repository root: editable install.
    assert re.search(r"pip install [^\n]*-e \.", text)


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml",
                                  "aws-cluster.yaml"])
def test_every_path_the_cluster_files_run_is_in_the_image(name):
    paths = _paths_run_by((CLUSTER / name).read_text())
    if name == "kuberay-rayjob.yaml":
        job = next(d for d in yaml.safe_load_all((CLUSTER / name).read_text())
                   if d.get("kind") == "RayJob")
        entry = job["spec"]["entrypoint"]
        assert "configs/paper/llama3.2-1b.yaml" in entry
        assert {"jobs/pipeline.py", "configs/paper/llama3.2-1b.yaml",
                "configs/deepspeed/zero2.json"} <= paths
    assert paths, f"{name}: no command found"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{name} runs paths that do not exist: {missing}"
    not_copied = sorted(p for p in paths if not _in_image(p))
    assert not not_copied, f"{name} runs paths cluster/Dockerfile does not copy: {not_copied}"


def test_every_paper_config_and_what_it_reads_is_in_the_image():
    configs = sorted((ROOT / "configs/paper").glob("*.yaml"))
    assert len(configs) >= 5, configs  # the paper's five models, at least
    for cfg in configs:
        rel = str(cfg.relative_to(ROOT))
        for path in [rel, *_config_files(rel)]:
            assert (ROOT / path).exists(), f"{rel} names missing file {path}"
            assert _in_image(path), f"{path} (read by {rel}) is not copied into the image"


def test_in_image_rejects_what_is_not_copied():
    # The helper itself must be able to say no.
    assert not _in_image("tests/test_cluster_files.py")
    assert not _in_image("runs/x/mlflow.db")
    assert not _in_image("orchestrator/__pycache__/config.cpython-311.pyc")
    assert _in_image("orchestrator/config.py")


def test_rayjob_containers_run_in_the_image_workdir():
    workdir, _ = _dockerfile()
    job = next(d for d in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())
               if d.get("kind") == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        for c in t["spec"]["containers"]:
            assert c.get("workingDir") == workdir, c["name"]


# ----------------------------------------------------------------------------- KubeRay


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _ray_cluster_specs(docs: list[dict]) -> list[dict]:
    specs = [d["spec"] for d in docs if d["kind"] == "RayCluster"]
    specs += [d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"]
    return specs


def _templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_enable_token_auth(name):
    specs = _ray_cluster_specs(_docs(name))
    assert specs
    for spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", name
        head_params = spec["headGroupSpec"].get("rayStartParams", {})
        if head_params.get("dashboard-host") == "0.0.0.0":
            assert spec["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_restrict_ray_ports_with_a_network_policy(name):
    docs = _docs(name)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies, f"{name}: no NetworkPolicy"
    for spec in _ray_cluster_specs(docs):
        for t in _templates(spec):
            labels = t.get("metadata", {}).get("labels", {})
            covering = [p for p in policies
                        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
            assert covering, f"{name}: a Ray pod ({labels}) is not selected by any NetworkPolicy"
            for pol in covering:
                assert "Ingress" in pol["spec"]["policyTypes"]
                for rule in pol["spec"]["ingress"]:
                    # A rule without `from` admits every source; none may be open.
                    assert rule.get("from"), f"{name}: open ingress rule {rule}"
                    for peer in rule["from"]:
                        assert "0.0.0.0/0" not in str(peer.get("ipBlock", ""))
                    if any("namespaceSelector" in p and "podSelector" not in p for p in rule["from"]):
                        # Other namespaces (the operator) reach the job API only.
                        assert [p["port"] for p in rule.get("ports", [])] == [8265]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_carry_no_credentials(name):
    text = (CLUSTER / name).read_text()
    for spec in _ray_cluster_specs(_docs(name)):
        for t in _templates(spec):
            for c in t["spec"]["containers"]:
                for e in c.get("env", []):
                    if e["name"] in CREDENTIAL_VARS or e["name"].startswith("AWS_"):
                        assert "value" not in e, f"{name}: literal {e['name']}"
                refs = [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
                assert "lethe-credentials" in refs, f"{name}: {c['name']} gets no credentials"
    for var in CREDENTIAL_VARS:
        assert f"{var}:" not in text.replace(f"--from-literal={var}", "")


# ----------------------------------------------------------------------------- launcher


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())


def test_launcher_mounts_nfs_on_the_host_only():
    cfg = _launcher()
    assert not any(re.search(r"\bmount\b", c) for c in cfg.get("setup_commands") or [])
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/shared" in init
    assert any("-v /mnt/shared:/mnt/shared" in o for o in cfg["docker"]["run_options"])


def test_launcher_commands_use_no_undefined_variables():
    cfg = _launcher()
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in cfg.get(key) or []:
            defined = set(re.findall(r"\b([A-Z_][A-Z0-9_]*)=", cmd)) | LAUNCHER_VARS
            used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", cmd))
            assert used <= defined, f"{key}: undefined {sorted(used - defined)} in {cmd!r}"


def test_launcher_starts_ray_with_token_auth_and_a_local_dashboard():
    cfg = _launcher()
    head = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert head and workers
    for cmd in head + workers:
        assert "RAY_AUTH_MODE=token" in cmd
    assert all("--dashboard-host=127.0.0.1" in c for c in head)
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_runtime_envs_hold_no_credentials():
    paths = sorted(CLUSTER.glob("runtime_env*.yaml"))
    assert {"runtime_env.yaml", "runtime_env.local.yaml"} <= {p.name for p in paths}, paths
    for path in paths:
        env = yaml.safe_load(path.read_text()).get("env_vars", {})
        assert not credential_env(env), path.name


# ----------------------------------------------------------------------------- credentials


SECRET = "s3cr3t-value-never-printed"


def test_credentials_from_the_shell_reach_the_runtime_env():
    from jobs.submit import build_runtime_env

    shell = {"HF_TOKEN": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
             "AWS_PROFILE": "laptop-only", "HOME": "/root", "MLFLOW_TRACKING_TOKEN": ""}
    env = build_runtime_env(str(CLUSTER / "runtime_env.yaml"), ".", environ=shell)
    ev = env["env_vars"]
    assert ev["HF_TOKEN"] == SECRET and ev["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert ev["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert "AWS_PROFILE" not in ev and "HOME" not in ev and "MLFLOW_TRACKING_TOKEN" not in ev
    assert ev["TORCH_EXTENSIONS_DIR"] == "/tmp/torch_extensions"  # the YAML's own variables stay
    assert env["working_dir"] == "."
    line = describe(ev)
    assert SECRET not in line and "HF_TOKEN" in line and "AWS_SECRET_ACCESS_KEY" in line


def test_submit_refuses_a_runtime_env_that_holds_a_credential(tmp_path):
    from jobs.submit import build_runtime_env

    bad = tmp_path / "env.yaml"
    bad.write_text(yaml.safe_dump({"env_vars": {"HF_TOKEN": "hf_x"}}))
    with pytest.raises(SystemExit, match="HF_TOKEN"):
        build_runtime_env(str(bad), None, environ={})


def test_submit_prints_names_never_values(monkeypatch, capsys):
    import ray.job_submission

    import jobs.submit as submit

    seen = {}

    class FakeClient:
        def __init__(self, address):
            seen["address"] = address

        def submit_job(self, *, entrypoint, runtime_env, submission_id):
            seen.update(entrypoint=entrypoint, runtime_env=runtime_env)
            return "raysubmit_fake"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    rc = submit.main(["--address", "http://127.0.0.1:1", "--runtime-env",
                      str(CLUSTER / "runtime_env.yaml"), "--no-wait", "--",
                      "python", "-m", "jobs.pipeline", "--config", "configs/demo.yaml"])
    out = capsys.readouterr()
    assert rc == 0
    assert seen["entrypoint"] == "python -m jobs.pipeline --config configs/demo.yaml"
    assert seen["runtime_env"]["env_vars"]["HF_TOKEN"] == SECRET
    assert SECRET not in out.out + out.err
    assert "HF_TOKEN" in out.out and "MLFLOW_TRACKING_TOKEN" in out.out


# ----------------------------------------------------------------------------- init_ray


def _init_calls(monkeypatch, address):
    import ray

    from orchestrator.config import config_from_dict
    from orchestrator.pipeline.run import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    # The embedded branch then checks the config's GPU asks against what Ray sees.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    cfg = config_from_dict({"name": "t", "models": [{"name": "m", "family": "llama",
                                                     "pretrained": "org/model"}],
                            "ray": {"address": address, "num_cpus": 3}})
    init_ray(cfg)
    assert len(calls) == 1
    return calls[0]


@pytest.mark.parametrize("address", [None, "local"])
def test_embedded_instance_never_joins_a_running_head(monkeypatch, address):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    kw = _init_calls(monkeypatch, address)
    # ray.init() without an address joins a head found on this machine; "local" never does.
    assert kw["address"] == "local" and kw["num_cpus"] == 3
    assert "HF_TOKEN" not in kw["runtime_env"]["env_vars"]  # local workers inherit the shell


def test_remote_address_forwards_credentials_without_printing_them(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for var in ("HF_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "AWS_ACCESS_KEY_ID"):
        monkeypatch.setenv(var, SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this shell's: never the cluster's
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    kw = _init_calls(monkeypatch, "ray://head.example:10001")
    assert kw["address"] == "ray://head.example:10001"
    ev = kw["runtime_env"]["env_vars"]
    assert "HF_HUB_OFFLINE" not in ev and "HF_DATASETS_OFFLINE" not in ev
    assert ev["HF_TOKEN"] == SECRET and ev["AWS_ACCESS_KEY_ID"] == SECRET
    assert ev["MLFLOW_TRACKING_PASSWORD"] == SECRET
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "HF_TOKEN" in out.out
