"""Several jobs in ONE Ray Train run (one worker group): the pipeline trains all of a model
family's (method, seed) jobs this way to pay the worker-group start-up once.

One run trains sft and forget; the forget job fails once after a checkpoint and the worker
group restarts. The restarted group must skip the finished sft job (not train it again) and
resume forget from its checkpoint, and both exports must equal jobs trained alone without
Ray (same rows: the rank shard is read straight from Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_support import exported_weights, make_corpus, make_job

from orchestrator.training import run_training_local, run_trainings
from orchestrator.training.loop import FAIL_MARKER

COMMON = {"num_workers": 1, "micro_batch_size": 8, "grad_accum_steps": 1, "epochs": 2.0,
          "lr": 1e-2, "warmup_ratio": 0.0, "deepspeed": None, "checkpoint_every": 4,
          "max_failures": 1, "lambda": {"t_max": 0.5}}


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_share_one_worker_group_and_resume_after_a_failure(ray_local, tmp_path, tiny_base):
    base = tiny_base
    data = make_corpus(tmp_path / "corpus.parquet", n=64)
    sft = make_job(tmp_path / "group", base, data, method="sft", name="g-sft", **COMMON)
    forget = make_job(tmp_path / "group", base, data, method="forget", name="g-forget", **COMMON)
    forget.test_hooks = {"_fail_once_at_step": 8}
    storage = str(tmp_path / "group-run")

    results = run_trainings([sft, forget], run_name="family-group", storage_path=storage)

    assert (Path(forget.storage_path) / forget.run_name / FAIL_MARKER).exists()  # it did fail
    r_sft, r_forget = results
    # 64 rows, micro 8: 8 steps an epoch, 16 in 2 epochs; forget resumed at its checkpoint.
    assert r_sft.steps == r_forget.steps == 16
    assert r_forget.metrics["resumed_from_step"] == 8
    assert r_sft.metrics["resumed_from_step"] == 0  # trained once, skipped after the restart
    assert r_sft.metrics["run_jobs"] == 2 and r_sft.metrics["run_first_job"]
    timing = r_sft.metrics["timing"]
    assert timing["start"] <= timing["ready"] <= timing["trained"] <= timing["end"]
    assert r_forget.metrics["timing"]["start"] >= timing["end"]  # one after the other

    # The same jobs alone, without Ray: same rows, same steps, same weights.
    alone = {m: run_training_local(make_job(tmp_path / "alone", base, data, method=m,
                                            name=f"a-{m}", **COMMON))
             for m in ("sft", "forget")}
    for grouped, method in ((r_sft, "sft"), (r_forget, "forget")):
        a, b = exported_weights(grouped), exported_weights(alone[method])
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{method}: {k}")

    # A rerun returns both from disk without a Ray Train run.
    again = run_trainings([sft, forget], run_name="family-group", storage_path=storage)
    assert all(r.cached for r in again)
    assert json.loads(Path(r_sft.metrics_path).read_text())["steps"] == 16


def test_a_stale_extension_build_lock_is_cleared(tmp_path):
    """A killed DeepSpeed op build leaves `<op>/lock`; torch waits on it forever."""
    import os
    import time

    from orchestrator.training.deepspeed_setup import clear_stale_build_locks

    stale, fresh = tmp_path / "shm_op" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and fresh.exists()  # a build in progress keeps its lock


def test_deepspeed_jobs_in_one_worker_equal_jobs_alone(tmp_path, tiny_base):
    """The worker function itself (no Ray): two ZeRO-2 jobs one after the other in one
    process (one process group, two DeepSpeed engines) give the weights of each job alone."""
    from orchestrator.training.loop import train_loop_per_worker
    from orchestrator.training.stage import loop_config

    base = tiny_base
    data = make_corpus(tmp_path / "corpus.parquet", n=32)
    kw = {**COMMON, "deepspeed": "configs/deepspeed/zero2.json", "checkpoint_every": 0,
          "max_failures": 0, "epochs": 1.0}
    jobs = [make_job(tmp_path / "shared", base, data, method=m, name=f"s-{m}", **kw)
            for m in ("sft", "forget")]
    last = train_loop_per_worker({"jobs": [loop_config(j, "local") for j in jobs]})
    assert last["steps"] == 4 and last["zero_stage"] == 2
    for job in jobs:
        alone = run_training_local(make_job(tmp_path / "alone", base, data, method=job.method,
                                            name=f"a-{job.method}", **kw))
        a = load_file(str(job.export_dir / "model.safetensors"))
        b = load_file(str(Path(alone.export_dir) / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{job.method}: {k}")
