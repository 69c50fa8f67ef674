"""A two-node Ray cluster on this machine (tests/two_node_cluster.py: a head and a second
node started with `ray start` on 127.0.0.1, each with its own temp dir, ports and custom
resource, token authentication on; started once for this module and
tests/test_cluster_equality.py, stopped by PID).

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
import secrets
import subprocess
import urllib.error
from pathlib import Path

import pytest
import two_node_cluster
import yaml
from tiny_configs import TINY
from two_node_cluster import BIN, ROOT, actors, api_get, cluster_env, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The session's one two-node cluster, shared with tests/test_cluster_equality.py: started
# once, stopped after the last test that uses it.
two_nodes = two_node_cluster.two_nodes

CANARY = "canary-" + secrets.token_hex(8)


def test_job_api_needs_the_token(two_nodes):
    with pytest.raises(urllib.error.HTTPError) as err:
        api_get(f"{two_nodes['dash']}/api/jobs/", None)
    assert err.value.code in (401, 403)
    assert isinstance(api_get(f"{two_nodes['dash']}/api/jobs/", two_nodes["token"]), list)


def test_credentials_reach_spread_actors_on_both_nodes_by_name_only(two_nodes):
    env = cluster_env(two_nodes["token"], HF_TOKEN=CANARY, MLFLOW_TRACKING_PASSWORD=CANARY)
    out, status, logs = submit(two_nodes, ["python", "-m", "jobs.cluster_probe"],
                               runtime_env=str(ROOT / "cluster/runtime_env.local.yaml"),
                               env=env, timeout=300)
    assert CANARY not in out
    assert "HF_TOKEN" in out and "MLFLOW_TRACKING_PASSWORD" in out
    assert status == "SUCCEEDED", logs[-3000:]
    assert CANARY not in logs
    probe = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("LETHE_PROBE "))
                       .split(" ", 1)[1])

    # Each node carries its own custom resource.
    marks = {k for n in probe["nodes"] for k in n["resources"] if k.startswith("lethe_")}
    assert marks == {"lethe_head", "lethe_node_b"} and len(probe["nodes"]) == 2
    # SPREAD, from Ray's state API: the probe's actors ran on two different nodes.
    ours = [a for a in actors(two_nodes, "Probe")
            if a["actor_id"] in {p["actor_id"] for p in probe["actors"]}]
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
        env=cluster_env(two_nodes["token"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "2 node(s)" in text and "total: CPU 4" in text
    assert ("scoring.num_cpus_per_actor=3 CPU per bundle, but no node has that much "
            "(largest node: 2 CPU)") in text
