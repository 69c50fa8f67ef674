"""One two-node Ray cluster on this machine for every test module that asks for it.

A head and a second node started with `ray start` on 127.0.0.1, each with its own temp dir,
ports and custom resource (`lethe_head`, `lethe_node_b`), token authentication on (a random
token shared through RAY_AUTH_TOKEN). Started once per test session, on first use, and
stopped by PID (with everything under each `ray start`) right after the last collected test
that uses it, or at the end of the session when a run stops early.

A test module uses it with `from two_node_cluster import two_nodes`; the fixture's value is
a dict: `dash` (job API / dashboard URL), `gcs` (host:port), `token`, `temps` (the nodes'
temp dirs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from proc_tree import free_port

from orchestrator.pipeline.credentials import is_credential

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cluster_env(token: str, **extra: str) -> dict[str, str]:
    """This shell's environment for a client of the cluster: no credentials, no RAY_ADDRESS,
    the cluster's token, Ray on loopback."""
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


def api_get(url: str, token: str | None) -> Any:
    """GET a dashboard / job API URL (with the cluster token when given), parsed JSON."""
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
        time.sleep(1)


def _alive_nodes(dash: str, token: str) -> list[dict]:
    body = api_get(f"{dash}/api/v0/nodes?limit=100", token)
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def actors(cluster: dict, class_name: str) -> list[dict]:
    """Every actor of `class_name` the cluster's state API knows (alive or dead), detailed."""
    url = (f"{cluster['dash']}/api/v0/actors?limit=1000&detail=1&filter_keys=class_name"
           f"&filter_predicates=%3D&filter_values={class_name}")
    return api_get(url, cluster["token"])["data"]["result"]["result"]


def _start_cluster(procs: list[subprocess.Popen], temps: list[str]) -> dict:
    """Start the head, then the second node; the processes are appended to `procs` as they
    start, so the caller stops them whatever happens."""
    token = secrets.token_hex(24)
    env = cluster_env(token)
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


class _Shared:
    """The session's one cluster: its value, its processes and temp dirs."""

    cluster: dict | None = None
    procs: list[subprocess.Popen] = []
    temps: list[str] = []

    @classmethod
    def start(cls, config: pytest.Config) -> dict:
        if cls.cluster is not None:
            return cls.cluster
        config.add_cleanup(cls.stop)  # a run that stops early still stops the nodes
        # A second try: on an overloaded machine a raylet gives up when its dashboard agent
        # takes more than ~15 s to start (Ray's fixed wait), which says nothing about Lethe.
        for attempt in (1, 2):
            cls.temps = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rha", "rhb")]  # short
            try:
                cls.cluster = _start_cluster(cls.procs, cls.temps)
                return cls.cluster
            except RuntimeError:
                cls.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def stop(cls) -> None:
        """Exactly the processes started here, each with everything under it (listed before
        the first signal), both nodes at once: SIGTERM, one grace period, SIGKILL."""
        pids = [p.pid for p in cls.procs]
        for proc in cls.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if sig == signal.SIGTERM and pids:
                time.sleep(3)
        for proc in cls.procs:
            proc.wait(timeout=30)
        for t in cls.temps:
            shutil.rmtree(t, ignore_errors=True)
        cls.cluster, cls.procs, cls.temps = None, [], []


@pytest.fixture(scope="module")
def two_nodes(request: pytest.FixtureRequest):
    cluster = _Shared.start(request.config)
    yield cluster
    # Stop now unless a later module of this session's selection uses the cluster too.
    items = request.session.items
    ours = [i for i, it in enumerate(items) if it.getparent(pytest.Module) is request.node]
    later = items[max(ours) + 1:] if ours else []
    if not any("two_nodes" in getattr(it, "fixturenames", ()) for it in later):
        _Shared.stop()


def submit(cluster: dict, entrypoint: list[str], *, runtime_env: str, env: dict[str, str],
           timeout: float = 600) -> tuple[str, str, str]:
    """`python -m jobs.submit --no-wait` (the repo as working dir) against the cluster's job
    API; waits for the job to end. Returns (submit output, final status, the job's logs)."""
    out = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", cluster["dash"], "--runtime-env",
         runtime_env, "--working-dir", str(ROOT), "--no-wait", "--", *entrypoint],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", out.stdout).group(0)
    dash, token = cluster["dash"], cluster["token"]
    deadline = time.time() + timeout
    while (status := api_get(f"{dash}/api/jobs/{job_id}", token)["status"]) not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {job_id} did not finish in {timeout:.0f} s"
        time.sleep(1)
    logs = api_get(f"{dash}/api/jobs/{job_id}/logs", token)["logs"]
    return out.stdout + out.stderr, status, logs
