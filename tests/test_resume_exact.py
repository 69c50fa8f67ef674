"""Two Ray Train workers, one SIGKILLed after a checkpoint: the worker group restarts, the
job resumes from that checkpoint and ends on exactly the weights of an uninterrupted run
(issues 11 and 12: multi-worker resume exactness, the 2-worker SIGKILL drill).

One Ray Train run holds both jobs (the cheapest way to get a reference here): job "whole"
trains uninterrupted first; job "killed" (the same config, seed and rows) is hit by a real
SIGKILL of one worker process as soon as its first checkpoint is reported. The kill is
done by a Ray Train callback on the controller (it runs when all ranks have reported the
checkpoint, while the workers wait for the controller to take their next report), so it
lands mid-run, not after the end. The workers are placed with SPREAD (one node here: both
land on it; the two-node placement is tests/test_cluster_two_nodes.py's).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training_support import make_base, make_corpus, make_job

from orchestrator.training import run_trainings
from orchestrator.training.context import read_rank_shard
from orchestrator.training.stage import loop_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# 32 rows / 2 ranks = 16 per rank, micro 4: 4 steps an epoch, 8 in 2 epochs; a checkpoint
# every 2 steps. No dropout in the tiny model, so the RNG plays no part in the weights.
COMMON = {"num_workers": 2, "micro_batch_size": 4, "grad_accum_steps": 1, "epochs": 2.0,
          "lr": 1e-2, "warmup_ratio": 0.0, "deepspeed": None, "checkpoint_every": 2,
          "max_failures": 1, "cpus_per_worker": 0.5, "lambda": {"t_max": 0.5}}


class KillOneWorkerAfterCheckpoint:
    """Ray Train callback (runs in the controller): SIGKILL one RayTrainWorker process the
    first time a checkpoint of job `job` is reported (its folder is named after the job:
    training/context.RayContext.report); the pid goes to `record`."""

    def __init__(self, job: str, record: str) -> None:
        self.job, self.record = job, record

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if (checkpoint is None or f"checkpoint_{self.job}_" not in Path(checkpoint.path).name
                or Path(self.record).exists()):
            return
        import ray
        from ray.util.state import list_actors

        workers = list_actors(address=ray.get_runtime_context().gcs_address,
                              filters=[("class_name", "=", "RayTrainWorker"),
                                       ("state", "=", "ALIVE")], detail=True)
        pid = max(int(a["pid"]) for a in workers)
        Path(self.record).write_text(json.dumps({"pid": pid, "step": metrics[0]["step"],
                                                 "workers": len(workers)}))
        os.kill(pid, signal.SIGKILL)

    # The rest of Ray Train's UserCallback interface: nothing to do.
    def after_exception(self, run_context, worker_exceptions) -> None:
        pass


def _callback(job: str, record: Path):
    from ray import cloudpickle
    from ray.train import UserCallback

    # Pickled by value (with Ray's own cloudpickle): the controller cannot import this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cls = type("KillOneWorker", (KillOneWorkerAfterCheckpoint, UserCallback), {})
    return cls(job, str(record))


def test_two_workers_sigkilled_after_a_checkpoint_resume_to_the_same_weights(ray_local, tmp_path):
    import ray

    base = make_base(tmp_path / "base")
    data = make_corpus(tmp_path / "corpus.parquet", n=32)
    whole = make_job(tmp_path, base, data, method="forget", name="whole", **COMMON)
    killed = make_job(tmp_path, base, data, method="forget", name="killed", **COMMON)
    record = tmp_path / "killed.json"
    killed.callbacks = [_callback("killed", record)]

    results = run_trainings([whole, killed], run_name="resume-exact",
                            storage_path=str(tmp_path / "ray"), placement="SPREAD")

    kill = json.loads(record.read_text())
    assert kill["workers"] == 2 and kill["step"] == 2  # one of two workers, after step 2
    with pytest.raises(ProcessLookupError):
        os.kill(kill["pid"], 0)
    r_whole, r_killed = results
    assert r_whole.steps == r_killed.steps == 8 == r_killed.metrics["planned_steps"]
    assert r_whole.metrics["resumed_from_step"] == 0
    assert r_killed.metrics["resumed_from_step"] >= 2  # from the checkpoint, not from zero

    a = load_file(str(Path(r_whole.export_dir) / "model.safetensors"))
    b = load_file(str(Path(r_killed.export_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    # Each rank's rows are fixed by the config alone (rank-strided over sorted sample ids),
    # so the restarted group read the same rows per rank as the first one.
    shards = [read_rank_shard(loop_config(killed, "ray"), r, 2) for r in (0, 1)]
    ids = [np.asarray(s.sample_ids) for s in shards]
    assert ids[0].tolist() == list(range(0, 32, 2)) and ids[1].tolist() == list(range(1, 32, 2))

    # The worker group asked Ray for SPREAD placement (the GCS's placement group table
    # keeps removed groups with their strategy).
    groups = ray.util.placement_group_table().values()
    assert any(g["strategy"] == "SPREAD" and len(g["bundles"]) == 2 for g in groups), groups
