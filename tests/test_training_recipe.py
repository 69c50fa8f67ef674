"""The recipe's small parts: fault hooks, worker job, step sums (no training here)."""

from __future__ import annotations

import math

import pytest
import torch
from test_training_support import make_job

from orchestrator.training.faults import FAIL_MARKER, FaultHooks
from orchestrator.training.stage import loop_config
from orchestrator.training.trainer import StepSums, WorkerJob


def test_fault_hooks_are_no_ops_without_test_hooks(tmp_path):
    hooks = FaultHooks.from_config({"storage_path": str(tmp_path), "run_name": "r"})
    loss = torch.tensor(1.5)
    assert hooks.poison(loss, 0) is loss
    hooks.after_checkpoint(3, True, barrier=lambda: pytest.fail("no barrier without a hook"))


def test_fault_hooks_poison_one_step_and_fail_once(tmp_path):
    config = {"storage_path": str(tmp_path), "run_name": "r", "_nan_at_step": 2,
              "test_hooks": {"_fail_once_at_step": 4}}
    hooks = FaultHooks.from_config(config)
    assert math.isnan(float(hooks.poison(torch.tensor(1.0), 1)))  # step index 1 = step 2
    assert float(hooks.poison(torch.tensor(1.0), 2)) == 1.0
    hooks.after_checkpoint(3, True, barrier=lambda: None)  # another step: nothing
    with pytest.raises(RuntimeError, match="injected failure after the checkpoint of step 4"):
        hooks.after_checkpoint(4, True, barrier=lambda: None)
    assert (tmp_path / "r" / FAIL_MARKER).exists()
    hooks.after_checkpoint(4, True, barrier=lambda: None)  # once only


def test_worker_job_reads_the_driver_config(tmp_path):
    job = make_job(tmp_path, "base", tmp_path / "data.parquet", method="forget", name="w",
                   max_steps=3)
    job.test_hooks = {"_nan_at_step": 2}
    wj = WorkerJob.from_config(loop_config(job, "local"))
    assert wj.job.to_dict() == job.to_dict() and wj.deepspeed_config is None
    assert wj.train.max_steps == 3 and wj.spec.family == "llama"


def test_step_sums_means():
    sums = StepSums(pos_ce=3.0, n_pos=2, neg_ce=0.0, n_neg=0, tokens=9)
    assert sums.mean_pos() == 1.5 and math.isnan(sums.mean_neg())
