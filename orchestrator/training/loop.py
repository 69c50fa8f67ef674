"""The Ray Train entry point of a worker: train the group's jobs one after the other.

`train_loop_per_worker(config)` is what TorchTrainer runs on every worker (and what
`run_training_local` calls without Ray). It opens the worker context and its process group
once, then hands each job to the recipe (`trainer.Trainer`); what one job does, step by
step, is there.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import TrainConfig
from orchestrator.training.context import make_context
from orchestrator.training.faults import FAIL_MARKER
from orchestrator.training.trainer import (
    STATE_FILE,
    NonFiniteLossError,
    Trainer,
    TrainerState,
    WorkerJob,
)

__all__ = ["FAIL_MARKER", "STATE_FILE", "NonFiniteLossError", "TrainerState",
           "train_loop_per_worker"]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train one model, or several one after the other (`config["jobs"]`: a list of such
    configs sharing this worker group). A config is TrainJob.to_dict() plus what the driver
    resolved: `backend` ("ray" or local), `deepspeed_config` (dict or None),
    `keep_sample_ids`. Returns the (last) job's final metrics (also reported and, on rank 0,
    written to each job's metrics.json)."""
    jobs = _job_configs(config)
    first = next(jobs, None)
    if first is None:  # a training session closed before its first job
        return {}
    ctx = make_context(first)
    device = ctx.device(TrainConfig.model_validate(first["train"]).use_gpu)
    ctx.init_process_group("nccl" if device.type == "cuda" else "gloo")
    final: dict[str, Any] = {}
    try:
        for job in itertools.chain([first], jobs):
            if _job_finished(job):  # exported before a restart of this worker group
                continue
            ctx.use_job(job)
            trainer = Trainer(WorkerJob.from_config(job), ctx)
            trainer.setup()
            final = trainer.train()
            del trainer
            _release_memory(device)
        return final
    finally:
        ctx.close()


def _job_configs(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The jobs of this worker group: a fixed list (`jobs`), one job, or the jobs a training
    session feeds over time (`feed`, training/session.py), in the same order on every rank."""
    if "feed" in config:
        from orchestrator.training.feed import feed_jobs

        return feed_jobs(config["feed"])
    return iter(config.get("jobs") or [config])


def _job_finished(config: dict[str, Any]) -> bool:
    """metrics.json is written by rank 0 after the export, before the closing barrier."""
    return (Path(config["output_dir"]) / "metrics.json").is_file()


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
