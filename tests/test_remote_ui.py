"""MLflow from a laptop (orchestrator/tracking/remote_ui.py): `lethe ui CONFIG` on a tracking
server prints its URL and, for a host only the cluster reaches, the `kubectl port-forward`
or SSH tunnel command, instead of refusing; the end-of-run hint is a `lethe ui` command for
the user's own machine (the config path and overrides the run was given), never the run
directory's copy of the config on the cluster's volume."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.tracking.remote_ui import host_kind, remote_ui_lines

REPO = Path(__file__).resolve().parents[1]
PAPER = "configs/paper/llama3.2-1b.yaml"
K8S_URI = "http://mlflow.lethe.svc.cluster.local:5000"


@pytest.mark.parametrize(("host", "kind"), [
    ("mlflow.lethe.svc.cluster.local", "k8s"), ("mlflow.lethe.svc", "k8s"), ("mlflow", "k8s"),
    ("10.0.3.7", "private"), ("172.20.1.2", "private"), ("192.168.1.9", "private"),
    ("ip-10-0-3-7.ec2.internal", "private"), ("127.0.0.1", "loopback"),
    ("localhost", "loopback"), ("mlflow.example.com", "public"), ("8.8.8.8", "public"),
])
def test_host_kind(host, kind):
    assert host_kind(host) == kind


def test_kubernetes_service_gets_a_port_forward():
    lines = remote_ui_lines(K8S_URI, 5000)
    assert lines[0].startswith(f"MLflow tracking server: {K8S_URI}")
    assert "  kubectl port-forward -n lethe svc/mlflow 5000:5000" in lines
    assert lines[-1] == "then open http://127.0.0.1:5000"
    bare = remote_ui_lines("http://mlflow:80", 8080)
    assert "  kubectl port-forward svc/mlflow 8080:80  (add -n <namespace> of the Ray cluster)" in bare


def test_private_address_gets_an_ssh_tunnel_and_credentials_never_show():
    lines = remote_ui_lines("http://alice:s3cret@10.0.3.7:5000/", 8081)
    text = "\n".join(lines)
    assert "s3cret" not in text and "alice" not in text
    assert "  ssh -N -L 8081:10.0.3.7:5000 <user>@<node>" in lines
    assert "ubuntu@$(ray get-head-ip cluster/aws-cluster.yaml)" in text
    assert lines[-1] == "then open http://127.0.0.1:8081"
    # a cluster job's loopback is the head node; on this machine it is this machine
    assert "ssh -N -L 5000:127.0.0.1:5000" in "\n".join(
        remote_ui_lines("http://127.0.0.1:5000", on_cluster=True))
    assert remote_ui_lines("http://127.0.0.1:5000")[-1] == "open http://127.0.0.1:5000"
    assert remote_ui_lines("https://mlflow.example.com")[-1] == "open https://mlflow.example.com"


def _no_server(*args, **kwargs):
    raise AssertionError("a local MLflow server was started for a remote tracking URI")


def test_lethe_ui_on_a_server_prints_instead_of_refusing(monkeypatch, capsys):
    """The paper config as shipped, pointed at the KubeRay MLflow service (override:
    tracking.tracking_uri): exit 0, the URL and the port-forward, no local server."""
    from orchestrator.cli import main
    from orchestrator.tracking import ui

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ui, "start_ui", _no_server)
    rc = main(["ui", PAPER, f"tracking.tracking_uri={K8S_URI}", "--port", "5001"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "kubectl port-forward -n lethe svc/mlflow 5001:5000" in out
    assert "then open http://127.0.0.1:5001" in out


def test_end_of_run_hint_is_a_command_for_the_users_machine(monkeypatch, capsys, tmp_path):
    """A cluster job (RAY_ADDRESS set) logging to the server its runtime env names: the hint
    is `lethe ui <config as given> <overrides> tracking.tracking_uri=<server>`; pasted (split
    like a shell) into the CLI it prints the port-forward."""
    from orchestrator.cli import main
    from orchestrator.pipeline.run import ui_hint
    from orchestrator.tracking import ui

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", K8S_URI)
    args = [PAPER, "run_dir=/mnt/shared/lethe-runs", "seed=1"]
    cfg = load_config(PAPER, args[1:])
    lines = ui_hint(cfg, K8S_URI, args)
    assert lines[0] == ("[lethe] open the MLflow UI from your machine: lethe ui "
                        f"{PAPER} run_dir=/mnt/shared/lethe-runs seed=1 "
                        f"tracking.tracking_uri={K8S_URI}")
    assert any("kubectl port-forward -n lethe svc/mlflow 5000:5000" in ln for ln in lines)
    assert not any("resolved_config.yaml" in ln or ".venv/bin" in ln for ln in lines)
    command = shlex.split(lines[0].split(": ", 1)[1])
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the laptop has not the job's variables
    monkeypatch.setattr(ui, "start_ui", _no_server)
    assert command[:2] == ["lethe", "ui"]
    assert main(command[1:]) == 0
    assert "kubectl port-forward -n lethe svc/mlflow 5000:5000" in capsys.readouterr().out


def test_end_of_run_hint_local_and_sqlite_on_a_cluster(monkeypatch, tmp_path):
    from orchestrator.pipeline.run import ui_hint

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    demo = load_config("configs/demo.yaml", [f"run_dir={tmp_path}"])
    store = f"sqlite:///{tmp_path}/lethe-demo/mlflow.db"
    [line] = ui_hint(demo, store, ["configs/demo.yaml", f"run_dir={tmp_path}"])
    assert f"lethe ui configs/demo.yaml run_dir={tmp_path}  (tracking store: {store})" in line
    # without the CLI's arguments: the run directory's copy (this machine's own path)
    [line] = ui_hint(demo, store, None)
    assert str(tmp_path / "lethe-demo" / "resolved_config.yaml") in line
    # a cluster job on a sqlite store: where the file is and how to reach a UI over it
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    paper = load_config(PAPER)
    [line] = ui_hint(paper, "sqlite:////mnt/shared/lethe-runs/paper-llama3.2-1b/mlflow.db",
                     [PAPER])
    assert "/mnt/shared/lethe-runs/paper-llama3.2-1b/mlflow.db, on the cluster's storage" in line
    assert f"lethe ui {PAPER} on a machine that mounts it" in line
    assert "ssh -N -L 5000:127.0.0.1:5000" in line


def test_lethe_run_passes_the_config_as_given(monkeypatch):
    from orchestrator.cli import main
    from orchestrator.pipeline import run

    seen = {}
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(run, "run_pipeline", lambda cfg, **kw: seen.update(kw))
    assert main(["run", "configs/demo.yaml", "seed=1"]) == 0
    assert seen["config_args"] == ["configs/demo.yaml", "seed=1"]
    assert seen["preflight"] is False
