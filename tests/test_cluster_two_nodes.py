"""A two-node Ray cluster on this machine: a head and a second node started with `ray start`
on 127.0.0.1, each with its own temp dir, ports and custom resource, token authentication on
(a random token shared through RAY_AUTH_TOKEN). Stopped by PID.

Checks, as a user of a real cluster would see them:
- the job API refuses a client without the token;
- `python -m jobs.submit` forwards the submitting shell's credentials by name: actors placed
  with SPREAD on both nodes (asserted from Ray's state API) see them, and neither the
  submit output nor the job's logs contain their values;
- `lethe plan --address` reads both nodes and refuses a bundle larger than any one node
  although the cluster as a whole has enough, naming the field.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from proc_tree import free_port, stop_tree
from tiny_configs import TINY

from orchestrator.pipeline.credentials import is_credential

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CANARY = "canary-" + secrets.token_hex(8)


def _env(token: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not is_credential(k) and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}", **extra)
    return env


# `ray start --address` for the second node. Ray binds every service to 127.0.0.1 only when
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (else it swaps 127.0.0.1 for the interface address,
# where the head's GCS does not listen), but with that setting the CLI refuses to start a
# non-head node ("multi-node clusters are not supported on Windows and OSX"). The CLI below
# is Ray's own, with only its view of that flag turned on; every Ray process it starts still
# sees RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and stays on loopback.
RAY_START_SECOND_NODE = """
import sys, types
import ray._private.ray_constants as constants
import ray.scripts.scripts as cli
view = types.ModuleType("ray_constants_for_cli")
view.__dict__.update(constants.__dict__)
view.ENABLE_RAY_CLUSTER = True
cli.ray_constants = view
sys.argv = ["ray", *sys.argv[1:]]
cli.main()
"""


def _node_ports() -> list[str]:
    """Every port a node opens, chosen free: two nodes share 127.0.0.1."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as fh:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=fh,
                                stderr=subprocess.STDOUT)
    proc.log = str(log)  # type: ignore[attr-defined]
    return proc


def _get(url: str, token: str | None) -> dict:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read().decode())


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            tails = "".join(f"\n--- {p.args[:3]}:\n{Path(p.log).read_text()[-2000:]}"
                            for p in procs)
            raise RuntimeError(f"two-node cluster: {what} did not happen{tails}")
        time.sleep(2)


def _alive_nodes(dash: str, token: str) -> list[dict]:
    body = _get(f"{dash}/api/v0/nodes?limit=100", token)
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _start_cluster(procs: list[subprocess.Popen], temps: list[str]) -> dict:
    """Start the head, then the second node; the processes are appended to `procs` as they
    start, so the caller stops them whatever happens."""
    token = secrets.token_hex(24)
    env = _env(token)
    gcs, dash_port = free_port(), free_port()
    procs.append(_start(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--ray-client-server-port={free_port()}", *_node_ports(), "--num-cpus=2",
         '--resources={"lethe_head": 1}', f"--temp-dir={temps[0]}", "--disable-usage-stats"],
        env, Path(temps[0]) / "start.log"))
    dash = f"http://127.0.0.1:{dash_port}"
    # The dashboard answers before the head's raylet has registered: wait for the node, so
    # the second node's start-up does not compete with the head's.
    _wait("the head node", lambda: len(_alive_nodes(dash, token)) == 1, 180, procs)
    procs.append(_start(
        [sys.executable, "-c", RAY_START_SECOND_NODE, "start", "--block",
         f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", *_node_ports(),
         "--num-cpus=2", '--resources={"lethe_node_b": 1}', f"--temp-dir={temps[1]}"],
        env, Path(temps[1]) / "start.log"))
    _wait("the second node joining", lambda: len(_alive_nodes(dash, token)) == 2, 180, procs)
    return {"dash": dash, "gcs": f"127.0.0.1:{gcs}", "token": token, "temps": temps}


@pytest.fixture(scope="module")
def two_nodes():
    # A second try: on an overloaded machine a raylet gives up when its dashboard agent takes
    # more than ~15 s to start (Ray's fixed wait), which says nothing about Lethe.
    for attempt in (1, 2):
        procs: list[subprocess.Popen] = []
        temps = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rha", "rhb")]  # short paths
        try:
            try:
                cluster = _start_cluster(procs, temps)
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            yield cluster
            return
        finally:
            for proc in reversed(procs):
                stop_tree(proc, grace=3)
            for t in temps:
                shutil.rmtree(t, ignore_errors=True)


def test_job_api_needs_the_token(two_nodes):
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(f"{two_nodes['dash']}/api/jobs/", None)
    assert err.value.code in (401, 403)
    assert isinstance(_get(f"{two_nodes['dash']}/api/jobs/", two_nodes["token"]), list)


def test_credentials_reach_spread_actors_on_both_nodes_by_name_only(two_nodes):
    dash, token = two_nodes["dash"], two_nodes["token"]
    env = _env(token, HF_TOKEN=CANARY, MLFLOW_TRACKING_PASSWORD=CANARY)
    out = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", dash, "--runtime-env",
         str(ROOT / "cluster/runtime_env.local.yaml"), "--working-dir", str(ROOT), "--no-wait",
         "--", "python", "-m", "jobs.cluster_probe"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert CANARY not in out.stdout + out.stderr
    assert "HF_TOKEN" in out.stdout and "MLFLOW_TRACKING_PASSWORD" in out.stdout
    job_id = re.search(r"raysubmit_\w+", out.stdout).group(0)

    deadline = time.time() + 300
    while (status := _get(f"{dash}/api/jobs/{job_id}", token)["status"]) not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, "probe job did not finish in 5 minutes"
        time.sleep(3)
    logs = _get(f"{dash}/api/jobs/{job_id}/logs", token)["logs"]
    assert status == "SUCCEEDED", logs[-3000:]
    assert CANARY not in logs
    probe = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("LETHE_PROBE "))
                       .split(" ", 1)[1])

    # Each node carries its own custom resource.
    marks = {k for n in probe["nodes"] for k in n["resources"] if k.startswith("lethe_")}
    assert marks == {"lethe_head", "lethe_node_b"} and len(probe["nodes"]) == 2
    # SPREAD, from Ray's state API: the probe's actors ran on two different nodes.
    actors = _get(f"{dash}/api/v0/actors?limit=100&detail=1&filter_keys=class_name"
                  "&filter_predicates=%3D&filter_values=Probe", token)["data"]["result"]["result"]
    ours = [a for a in actors if a["actor_id"] in {p["actor_id"] for p in probe["actors"]}]
    assert len(ours) == 2
    assert len({a["node_id"] for a in ours}) == 2
    # Credentials reached the workers on both nodes (and the driver), by name.
    for a in probe["actors"]:
        assert a["credentials"] == ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"]
    assert probe["driver_credentials"] == ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"]
    # Not asserted (Ray's behaviour, documented in docs/CLUSTER.md): which of Ray's own files
    # hold the runtime env's values. Printed for the record (pytest -s).
    held = sorted(str(p.relative_to(t)) for t in two_nodes["temps"] for p in Path(t).rglob("*")
                  if p.is_file() and p.stat().st_size < 50_000_000
                  and CANARY.encode() in p.read_bytes())
    print(f"\n[two-node] files of Ray's own holding the credential value: {held}")


def test_plan_reads_both_nodes_and_refuses_a_bundle_no_node_can_hold(two_nodes, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, run_dir=str(tmp_path / "runs"))))
    out = subprocess.run(
        [str(BIN / "lethe"), "plan", str(cfg), "scoring.num_cpus_per_actor=3",
         "--address", two_nodes["gcs"]],
        env=_env(two_nodes["token"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "2 node(s)" in text and "total: CPU 4" in text
    assert ("scoring.num_cpus_per_actor=3 CPU per bundle, but no node has that much "
            "(largest node: 2 CPU)") in text
