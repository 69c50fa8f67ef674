"""The pipeline submitted with `ray job submit` to two nodes gives the one-node results
(issue 11, item 2).

`python -m jobs.submit ... -- python -m jobs.train --config ...` (the pipeline up to the
trainings: synthetic data, base, tokens, reference, scores, partition, one forget training)
runs on the two-node cluster of tests/two_node_cluster.py (a head and a second `ray start`
node on 127.0.0.1, token auth, each with its own custom resource; shared with
tests/test_cluster_two_nodes.py). The config asks for 2 scoring actors and 2 Ray Train
workers with SPREAD placement (the scoring stage is a Ray Data actor pool). Asserted from the cluster's state API: the scoring actors ran on
two different nodes, and so did the Train workers (the reference and the training share
one worker group, whose two bundles sat on two nodes).

Then the same config runs on the session's one-node instance, in this process, from the
job's cached base, tokens and reference (the job's scores, partition and train stages and its
training session's checkpoints are moved aside first, so those three are recomputed): the stage keys are the same, the scores
equal within 1e-6 (Ray Data may batch other rows together: the last bits only) and
the trained weights equal within tolerance (the gradient all-reduce crossed nodes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import two_node_cluster
import yaml
from safetensors.torch import load_file
from test_scoring import _assert_close_scores
from tiny_configs import TINY
from two_node_cluster import ROOT, actors, api_get, cluster_env, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The session's one two-node cluster: started once for this module and
# tests/test_cluster_two_nodes.py, stopped after the last test that uses it.
two_nodes = two_node_cluster.two_nodes

RECOMPUTED = ("scores", "partition", "train")
# The training session's Ray Train storage (its checkpoints): left in place, the one-node
# run would resume the two-node training at its last step instead of training.
SESSIONS = "sessions"


def _config(run_dir: Path) -> dict:
    raw = dict(TINY, name="two-nodes", run_dir=str(run_dir))
    # 2100 rows: several Ray Data blocks, work for both scoring actors.
    raw["data"] = {**TINY["data"], "synthetic": {**TINY["data"]["synthetic"], "num_train": 2100}}
    raw["reference"] = {"subset_size": 64, "seed": 0}
    raw["scoring"] = {**TINY["scoring"], "num_actors": 2, "scheduling_strategy": "SPREAD",
                      "num_cpus_per_actor": 0.5}
    # Two optimizer steps (reference and training): the weights' equality needs no more.
    raw["train"] = {**TINY["train"], "methods": ["forget"], "num_workers": 2,
                    "placement_strategy": "SPREAD", "max_steps": 2, "cpus_per_worker": 0.5}
    raw["tracking"] = {"enabled": False}
    # One training session: the reference and the training share one worker group.
    raw["ray"] = {**TINY["ray"], "max_parallel_trainings": 1}
    return raw


def _stage_dirs(stages: Path, name: str) -> list[Path]:
    return sorted(p for p in (stages / name).iterdir() if (p / "_SUCCESS.json").is_file())


def test_pipeline_submitted_to_two_nodes_spreads_and_gives_the_one_node_results(
        two_nodes, ray_local, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.pipeline.run import run_pipeline
    from orchestrator.scoring import score_files

    cfg_path = tmp_path / "two-nodes.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path / "runs")))
    out, status, logs = submit(
        two_nodes, ["python", "-m", "jobs.train", "--config", str(cfg_path)],
        runtime_env=str(ROOT / "cluster/runtime_env.local.yaml"),
        env=cluster_env(two_nodes["token"]), timeout=540)
    (tmp_path / "job.log").write_text(logs)  # the job's timeline is at its end
    assert status == "SUCCEEDED", (out + logs)[-4000:]

    # Where things ran, from the cluster's state API.
    scorers = actors(two_nodes, "MapWorker(MapBatches(ScoreBatches))")  # Ray Data's pool
    workers = actors(two_nodes, "RayTrainWorker")
    assert len(scorers) == 2 and len({a["node_id"] for a in scorers}) == 2, scorers
    assert len(workers) == 2 and len({a["node_id"] for a in workers}) == 2, workers  # one group
    groups = api_get(f"{two_nodes['dash']}/api/v0/placement_groups?limit=100&detail=1",
                     two_nodes["token"])["data"]["result"]["result"]
    spread = [g for g in groups if len(g.get("bundles") or []) == 2
              and len({b.get("node_id") for b in g["bundles"]}) == 2]
    assert spread, groups  # the workers' group: one bundle on each node

    # The same config on one node (the session's instance), from the job's cached
    # upstream stages; scores, partition and train are recomputed.
    stages = tmp_path / "runs" / "two-nodes" / "stages"
    aside = tmp_path / "two-node-stages"
    aside.mkdir()
    for name in (*RECOMPUTED, SESSIONS):
        shutil.move(stages / name, aside / name)
    run_pipeline(load_config(cfg_path), until="train")

    for name in RECOMPUTED:  # same inputs, same keys: nothing depends on the placement
        assert [p.name for p in _stage_dirs(aside, name)] == \
            [p.name for p in _stage_dirs(stages, name)], name
    [two_scores], [one_scores] = (_stage_dirs(d, "scores") for d in (aside, stages))
    two, one = (pa.concat_tables([pq.read_table(f) for f in score_files(d / "scores")])
                for d in (two_scores, one_scores))
    _assert_close_scores(two, one, atol=1e-6)  # batches may hold other rows: last bits only
    [two_train], [one_train] = (_stage_dirs(d, "train") for d in (aside, stages))
    for d in (two_train, one_train):  # both trained their 2 steps from the base
        metrics = json.loads((d / "run" / "metrics.json").read_text())
        assert (metrics["steps"], metrics["resumed_from_step"]) == (2, 0), (d, metrics)
    w_two, w_one = (load_file(str(d / "run" / "model" / "model.safetensors"))
                    for d in (two_train, one_train))
    [base] = _stage_dirs(stages, "base")
    w_base = load_file(str(base / "model" / "model.safetensors"))
    assert w_two.keys() == w_one.keys()
    assert any(not torch.equal(w_two[k], w_base[k]) for k in w_base)  # training moved them
    for k in w_two:
        torch.testing.assert_close(w_two[k], w_one[k], rtol=1e-4, atol=1e-5, msg=k)
