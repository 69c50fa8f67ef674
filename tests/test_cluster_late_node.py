"""A node that joins while the scoring stage waits for room: the stage then uses both nodes.

No start-time snapshot of the cluster sizes the scoring stage: it asks Ray Data for its
actor pool up to `scoring.num_actors`, and the actors that do not fit wait in Ray's queue.
Here a head node (3 CPUs) holds one scoring actor (2 CPUs each); the second actor waits,
PENDING_CREATION in Ray's state API, while the first scores. A second node (2 CPUs) then
joins, the pending actor starts there, and both actors score batches before the stage ends.

The cluster is this module's own (a head and a node started with `ray start` on 127.0.0.1,
token auth, as tests/two_node_cluster.py starts its pair), stopped by PID at the end. The
stage call runs in a driver subprocess (tests/slow_scoring.py: `run_scoring`, with a scorer
that sleeps a second per batch so the stage outlasts the node's start-up).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from proc_tree import stop_tree
from slow_scoring import SCORER, models_and_tokens, start_slow_scoring
from two_node_cluster import (
    BIN,
    RAY_START_SECOND_NODE,
    _alive_nodes,
    _node_ports,
    _start,
    _wait,
    actors,
    cluster_env,
    free_port,
)

from orchestrator.cache import SUCCESS

pytestmark = [pytest.mark.ray, pytest.mark.slow]



@pytest.fixture
def head_only(tmp_path):
    """A head node with 3 CPUs; `join()` starts the second node (2 CPUs)."""
    token = secrets.token_hex(24)
    env = cluster_env(token)
    temps = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rla", "rlb")]
    procs: list[subprocess.Popen] = []
    gcs, dash_port = free_port(), free_port()
    dash = f"http://127.0.0.1:{dash_port}"
    procs.append(_start(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--ray-client-server-port={free_port()}", *_node_ports(), "--num-cpus=3",
         f"--temp-dir={temps[0]}", "--disable-usage-stats"],
        env, Path(temps[0]) / "start.log"))

    def join() -> None:
        procs.append(_start(
            [sys.executable, "-c", RAY_START_SECOND_NODE, "start", "--block",
             f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", *_node_ports(),
             "--num-cpus=2", f"--temp-dir={temps[1]}"],
            env, Path(temps[1]) / "start.log"))
        _wait("the second node joining", lambda: len(_alive_nodes(dash, token)) == 2, 240, procs)

    try:
        _wait("the head node", lambda: len(_alive_nodes(dash, token)) == 1, 240, procs)
        yield {"dash": dash, "gcs": f"127.0.0.1:{gcs}", "token": token, "env": env, "join": join}
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                stop_tree(proc, grace=3.0)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def test_a_node_joining_while_the_stage_waits_takes_scoring_work(head_only, tmp_path):
    models, tokens = models_and_tokens(tmp_path, 160)  # 40 batches of 4
    out = tmp_path / "scores"
    log = tmp_path / "driver.log"
    t0 = time.time()
    driver = start_slow_scoring(head_only["gcs"], tokens, models, out, log,
                                {"num_actors": 2, "num_cpus_per_actor": 2, "batch_size": 4,
                                 "token_budget": 200}, env=head_only["env"], embedded=False)
    try:
        def state(name: str) -> list[dict]:
            return [a for a in actors(head_only, SCORER) if a["state"] == name]

        # The run waits: one actor scores on the head, the other is pending (no room).
        deadline = time.time() + 240
        while not (state("ALIVE") and state("PENDING_CREATION")
                   and (out / "_actor_stats").is_dir() and list((out / "_actor_stats").iterdir())):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, (actors(head_only, SCORER), log.read_text()[-3000:])
            time.sleep(0.5)
        waited_at = time.time() - t0
        head_node = state("ALIVE")[0]["node_id"]
        head_only["join"]()
        driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            stop_tree(driver)
    text = log.read_text()
    assert driver.returncode == 0 and "driver: finished" in text, text[-3000:]
    scorers = actors(head_only, SCORER)
    assert len(scorers) == 2 and len({a["node_id"] for a in scorers}) == 2, scorers
    assert any(a["node_id"] != head_node for a in scorers)
    summary = json.loads((out / SUCCESS).read_text())
    assert summary["rows"] == summary["rows_scored_this_run"] == 160
    assert summary["timings"]["actors"] == 2  # both actors scored batches
    print(f"\n[late node] pending actor seen {waited_at:.1f} s in; the stage finished on both "
          f"nodes {time.time() - t0:.1f} s after start")
