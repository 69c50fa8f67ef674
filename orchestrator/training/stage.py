"""The Ray Train driver: `run_training(job)` builds a V2 TorchTrainer around the plain loop.

Resume is by name: rerunning with the same `run_name` and `storage_path` makes
`ray.train.get_checkpoint()` return the latest checkpoint inside the workers (in Ray 2.60,
TorchTrainer(resume_from_checkpoint=...) raises). A finished run (its `_SUCCESS.json`
beside the export) is returned from disk without starting Ray Train.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.training.data import select_subset
from orchestrator.training.deepspeed_setup import load_deepspeed_config
from orchestrator.training.export import write_json_atomic
from orchestrator.training.job import TrainJob, TrainResult
from orchestrator.training.loop import train_loop_per_worker


def _keep_filter(keep: np.ndarray):
    keep_arr = pa.array(keep)

    def _filter(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("sample_id"), keep_arr))

    return _filter


def planned_updates(n_rows: int, world: int, micro: int, gas: int, epochs: float,
                    max_steps: int | None) -> int:
    """Optimizer steps, known before any worker starts (the workers derive the same)."""
    if max_steps is not None:
        return max_steps
    per_rank = n_rows // world
    if per_rank == 0:
        raise ValueError(f"{n_rows} training rows cannot feed {world} workers")
    return max(1, math.floor(epochs * math.ceil(per_rank / micro) / gas))


def loop_config(job: TrainJob, backend: str) -> dict[str, Any]:
    """What every worker receives: the job as a dict plus what the driver resolved once."""
    train = job.train_config()
    cfg = {**job.to_dict(), **job.test_hooks, "backend": backend,
           "deepspeed_config": load_deepspeed_config(train.deepspeed) if train.deepspeed else None}
    if backend != "ray" and job.subset is not None:  # Ray filters in the Dataset instead
        ids = pq.read_table(job.train_path, columns=["sample_id"]).column("sample_id").to_numpy()
        cfg["keep_sample_ids"] = select_subset(ids, job.subset).tolist()
    return cfg


def run_training(job: TrainJob) -> TrainResult:
    """Train (or resume, or return the cached result of) one model; see the module doc."""
    if job.success_path.is_file():
        return TrainResult.load(job.success_path)
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train_config()
    if not Path(job.train_path).exists():
        raise FileNotFoundError(f"training data not found: {job.train_path}")
    columns = ["sample_id", "input_ids", job.class_column]
    ds = ray.data.read_parquet(job.train_path, columns=columns)
    n_rows = pq.ParquetFile(job.train_path).metadata.num_rows if Path(job.train_path).is_file() \
        else ds.count()
    if job.subset is not None:
        ids = pq.read_table(job.train_path, columns=["sample_id"]).column("sample_id").to_numpy()
        keep = select_subset(ids, job.subset)
        n_rows = len(keep)
        ds = ds.map_batches(_keep_filter(keep), batch_format="pyarrow", batch_size=None)
    planned = planned_updates(n_rows, train.num_workers, train.micro_batch_size,
                              train.grad_accum_steps, train.epochs, train.max_steps)

    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(job, "ray"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=str(Path(job.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(job.callbacks) or None,
        ),
        datasets={"train": ds},
    )
    started = time.perf_counter()
    result = trainer.fit()
    metrics_path = Path(job.output_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"training run {job.run_name} ended without {metrics_path} "
                           f"(Ray result error: {getattr(result, 'error', None)})")
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["planned_steps"] = planned
    write_json_atomic(metrics_path, metrics)
    out = TrainResult(export_dir=str(job.export_dir), metrics_path=str(metrics_path),
                      metrics=metrics, steps=int(metrics["steps"]))
    write_json_atomic(job.success_path, {"job": job.to_dict(), "result": out.to_dict()})
    return out


def run_training_local(job: TrainJob) -> TrainResult:
    """The same run without Ray (one worker): for a GPU box without Ray, or a debugger."""
    if job.success_path.is_file():
        return TrainResult.load(job.success_path)
    train = job.train_config()
    if train.num_workers != 1:
        raise ValueError(f"run_training_local runs one worker; train.num_workers is "
                         f"{train.num_workers}")
    started = time.perf_counter()
    metrics = train_loop_per_worker(loop_config(job, "local"))
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics_path = Path(job.output_dir) / "metrics.json"
    write_json_atomic(metrics_path, metrics)
    out = TrainResult(export_dir=str(job.export_dir), metrics_path=str(metrics_path),
                      metrics=metrics, steps=int(metrics["steps"]))
    write_json_atomic(job.success_path, {"job": job.to_dict(), "result": out.to_dict()})
    return out
