"""Where the per-worker loop runs: inside Ray Train, or alone (the no-Ray shim).

The recipe (`trainer.Trainer`) talks only to a `WorkerContext`: rank and world size, its
shard of the training rows, `report(metrics, checkpoint_dir)`, the latest checkpoint to
resume from, and the job's test-only fault hooks (`faults`, see faults.py). The Ray
version forwards to `ray.train`; the local version (world size 1, e.g. a GPU box without
Ray, a profiler or a debugger) keeps checkpoints under `<storage>/<run>/checkpoints/` and
resumes from the newest complete one, so both resume the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.training import distributed
from orchestrator.training.data import TokenRows, read_table, rows_from_table, shard_for_rank
from orchestrator.training.faults import FaultHooks

COMPLETE = "_COMPLETE"


class WorkerContext(Protocol):
    """What the recipe needs from where it runs (LocalContext or RayContext)."""

    rank: int
    world_size: int
    faults: FaultHooks

    def device(self, use_gpu: bool) -> torch.device: ...
    def train_rows(self) -> TokenRows: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None: ...
    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...


def require_cuda(why: str) -> None:
    """Fail clearly instead of training on CPU when the config asked for GPUs."""
    if torch.cuda.is_available():
        return
    build = torch.version.cuda
    hint = ("this torch is a CPU-only build (torch " + torch.__version__ + "): install the CUDA "
            "wheel matching the node's driver" if build is None else
            f"torch {torch.__version__} (CUDA {build}) sees no device: check the driver "
            "(nvidia-smi), CUDA_VISIBLE_DEVICES and that the worker was given a GPU")
    raise RuntimeError(f"{why}, but no CUDA device is visible to this process: {hint}. "
                       "Set train.use_gpu=false to train on CPU.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalContext:
    """World size 1, no Ray. A process group of one is created for DeepSpeed's sake."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.metrics_log: list[dict[str, Any]] = []
        self.use_job(config)

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            require_cuda("train.use_gpu is true")
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def init_process_group(self, backend: str) -> None:
        if dist.is_initialized():
            return
        # A fresh port each time: a MASTER_PORT left in the environment by an earlier group
        # of this process (or inherited from a parent) may still be bound. The variables are
        # put back in close(): left behind, they reach every child process (a `ray start`
        # launched later inherits them, and accelerate in lm-eval then joins a "distributed"
        # group on that stale port: EADDRINUSE).
        launch = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        self._saved_env = {key: os.environ.get(key) for key in launch}
        os.environ.update(launch)
        dist.init_process_group(backend=backend, rank=0, world_size=1)
        self._owns_group = True

    def close(self) -> None:
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            distributed.forget_groups()
            ds_comm = sys.modules.get("deepspeed.comm.comm")
            if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
                # Through DeepSpeed, which also drops its cached world/data-parallel groups:
                # a second local run in this process would otherwise reuse destroyed groups.
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def use_job(self, config: dict[str, Any]) -> None:
        """The next job of this worker (several jobs can share one worker group)."""
        self.config = config
        self.faults = FaultHooks.from_config(config)
        self.run_dir = Path(config["storage_path"]) / config["run_name"]
        self.checkpoint_root = self.run_dir / "checkpoints"

    def train_rows(self) -> TokenRows:
        return read_rank_shard(self.config, 0, 1)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        self.metrics_log.append(dict(metrics))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is not None:
            dest = self.checkpoint_root / f"checkpoint_{step:08d}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)
            (dest / COMPLETE).touch()  # written last: a half-copied folder is never resumed

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        done = sorted(p for p in self.checkpoint_root.glob("checkpoint_*") if (p / COMPLETE).exists())
        yield done[-1] if done else None


class RayContext:
    """Inside a Ray Train V2 worker (TorchTrainer has set up the process group)."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train

        _quiet_per_report_logs()
        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.use_job(config)

    def device(self, use_gpu: bool) -> torch.device:
        # Ray Train may narrow CUDA_VISIBLE_DEVICES per worker, so the local rank is not
        # necessarily the CUDA index; Ray knows which device this worker owns.
        if use_gpu:
            require_cuda(f"train.use_gpu is true (Ray Train worker rank {self.rank})")
            from ray.train.torch import get_device

            dev = get_device()
            torch.cuda.set_device(dev)
            return dev
        return torch.device("cpu")

    def init_process_group(self, backend: str) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Ray Train did not set up torch.distributed for this worker")

    def close(self) -> None:  # Ray Train owns the process group
        pass

    def use_job(self, config: dict[str, Any]) -> None:
        self.config = config
        self.faults = FaultHooks.from_config(config)

    def train_rows(self) -> TokenRows:
        """This rank's fixed shard, read straight from the job's Parquet file (shared storage).

        A streaming split hands blocks to whichever worker asks first, so the rows of a rank
        could change between runs and after a restart; a rank-strided shard of the rows
        sorted by sample_id cannot.
        """
        return read_rank_shard(self.config, self.rank, self.world_size)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        ckpt = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Same name on every rank: Ray merges the ranks' shard files into one folder. The
        # job's name keeps the checkpoints of jobs sharing this worker group apart.
        job = self.config["run_name"][-12:]
        name = f"checkpoint_{job}_{step:08d}" if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)


def _quiet_per_report_logs() -> None:
    """Ray Train V2 logs every `ray.train.report` (the whole metrics dict) at INFO from each
    worker to the driver's console; the curves already go to MLflow and the progress line,
    so keep only its warnings. (Here, not in the loop: a run without Ray must not import it.)"""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # a private module: a Ray that moves it keeps its INFO lines
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def read_rank_shard(config: dict[str, Any], rank: int, world: int) -> TokenRows:
    """Rows of the job's training file (its subset, when it has one), rank-strided."""
    keep = config.get("keep_sample_ids")
    keep = np.asarray(keep) if keep is not None else None
    table = read_table(config["train_path"], ["sample_id", "input_ids", config["class_column"]],
                       keep)
    return shard_for_rank(rows_from_table(table, config["class_column"]), rank, world)


def make_context(config: dict[str, Any]) -> LocalContext | RayContext:
    return RayContext(config) if config.get("backend") == "ray" else LocalContext(config)
