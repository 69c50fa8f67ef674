"""Where the per-worker loop runs: inside Ray Train, or alone (the no-Ray shim).

The loop talks only to a `WorkerContext`: rank and world size, its shard of the training
rows, `report(metrics, checkpoint_dir)` and the latest checkpoint to resume from. The Ray
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from orchestrator.training.data import TokenRows, read_table, rows_from_table, shard_for_rank

COMPLETE = "_COMPLETE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalContext:
    """World size 1, no Ray. A process group of one is created for DeepSpeed's sake."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.config = config
        self.run_dir = Path(config["storage_path"]) / config["run_name"]
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.metrics_log: list[dict[str, Any]] = []

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu and torch.cuda.is_available():
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def init_process_group(self, backend: str) -> None:
        if dist.is_initialized():
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group(backend=backend, rank=0, world_size=1)
        self._owns_group = True

    def close(self) -> None:
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()

    def train_rows(self) -> TokenRows:
        cfg = self.config
        keep = np.asarray(cfg["keep_sample_ids"]) if cfg.get("keep_sample_ids") is not None else None
        table = read_table(cfg["train_path"], ["sample_id", "input_ids", cfg["class_column"]], keep)
        return shard_for_rank(rows_from_table(table, cfg["class_column"]), 0, 1)

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

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.config = config

    def device(self, use_gpu: bool) -> torch.device:
        # Ray Train may narrow CUDA_VISIBLE_DEVICES per worker, so the local rank is not
        # necessarily the CUDA index; Ray knows which device this worker owns.
        if use_gpu and torch.cuda.is_available():
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

    def train_rows(self) -> TokenRows:
        """This worker's shard of the Ray Dataset, held locally (sorted by sample_id)."""
        shard = self._train.get_dataset_shard("train")
        tables = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
        if not tables:
            raise ValueError(f"rank {self.rank}: empty training shard")
        table = pa.concat_tables(tables)
        return rows_from_table(table, self.config["class_column"])

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        ckpt = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Same name on every rank: Ray merges the ranks' shard files into one folder.
        name = f"checkpoint_{step:08d}" if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)


def make_context(config: dict[str, Any]) -> LocalContext | RayContext:
    return RayContext(config) if config.get("backend") == "ray" else LocalContext(config)
