"""The Ray Train driver: `run_trainings(jobs)` builds one V2 TorchTrainer around the plain
loop and trains the jobs one after the other in its worker group (`run_training(job)` is the
one-job case).

Resume is by name: rerunning with the same run name and storage path makes
`ray.train.get_checkpoint()` return the latest checkpoint inside the workers (in Ray 2.60,
TorchTrainer(resume_from_checkpoint=...) raises). A finished job (its `_SUCCESS.json`
beside the export) is returned from disk without starting Ray Train.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from orchestrator.names import PLACEMENT_STRATEGIES
from orchestrator.training.data import select_subset
from orchestrator.training.deepspeed_setup import load_deepspeed_config
from orchestrator.training.export import write_json_atomic
from orchestrator.training.job import TrainJob, TrainResult
from orchestrator.training.loop import train_loop_per_worker
from orchestrator.training.ray_entry import lean_torch_trainer, train_loop_entry


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
    """What every worker receives: the job as a dict plus what the driver resolved once.

    The subset's sample ids are resolved here for every backend: workers read their rows
    straight from the Parquet file with a fixed rank-strided shard, so which rows a rank sees
    never depends on scheduling, and is the same after a restart.
    """
    train = job.train_config()
    cfg = {**job.to_dict(), **job.test_hooks, "backend": backend,
           "deepspeed_config": load_deepspeed_config(train.deepspeed) if train.deepspeed else None}
    if job.subset is not None:
        ids = pq.read_table(job.train_path, columns=["sample_id"]).column("sample_id").to_numpy()
        cfg["keep_sample_ids"] = select_subset(ids, job.subset).tolist()
    return cfg


def _planned(job: TrainJob, config: dict[str, Any]) -> int:
    """Optimizer steps of a job, from its loop config (whose subset is already resolved)."""
    train = job.train_config()
    keep = config.get("keep_sample_ids")
    # A file or a folder of part files (footers only; names starting "_" or "." are skipped).
    n_rows = (len(keep) if keep is not None
              else pads.dataset(job.train_path, format="parquet").count_rows())
    return planned_updates(n_rows, train.num_workers, train.micro_batch_size,
                           train.grad_accum_steps, train.epochs, train.max_steps)




def placement_strategy(train: Any, override: str | None = None) -> str:
    """How Ray places a run's workers: PACK (default: as few nodes as possible, one node when
    it fits) or SPREAD (one worker per node where it can: a failed node loses one rank, and
    each node's GPUs/NICs serve one worker). `train.placement_strategy` when the config has
    it; `override` (a caller's explicit choice) wins."""
    value = override or getattr(train, "placement_strategy", None) or "PACK"
    if value not in PLACEMENT_STRATEGIES:
        raise ValueError(f"train.placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                         f"got {value!r}")
    return value


def worker_group_shape(train: Any) -> tuple:
    """What a job asks of its worker group: jobs can share one group (one run, a session)
    when they ask for the same."""
    return (train.num_workers, train.use_gpu, train.cpus_per_worker, train.gpus_per_worker,
            train.max_failures, placement_strategy(train))


def _group_key(job: TrainJob) -> tuple:
    return worker_group_shape(job.train_config())


def make_trainer(train: Any, loop_config: dict[str, Any], run_name: str, storage_path: str,
                 placement: str | None = None, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer of one run: `train`'s worker group around the plain loop (a fixed
    job list for `run_trainings`, a job feed for a training session)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker or 1.0
    return lean_torch_trainer(
        train_loop_entry,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=placement_strategy(train, placement)),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )


def annotate_metrics(job: TrainJob, **fields: Any) -> None:
    """Add what the driver knows (plan, the run's start, its job count) to a job's
    metrics.json, which rank 0 wrote after the export."""
    path = Path(job.output_dir) / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics.update(fields)
    write_json_atomic(path, metrics)


def run_training(job: TrainJob) -> TrainResult:
    """Train (or resume, or return the cached result of) one model; see the module doc."""
    return run_trainings([job])[0]


def run_trainings(jobs: list[TrainJob], run_name: str | None = None,
                  storage_path: str | None = None,
                  placement: str | None = None) -> list[TrainResult]:
    """Train several models, one after the other, in ONE Ray Train run (one worker group).

    A Ray Train run costs tens of seconds of start-up (worker processes, imports, process
    group) before its first step: on a small model that is most of the run. Jobs of one
    model family (methods x seeds) ask for the same workers, so they share them: each job
    still has its own output folder, metrics, MLflow run and export. A finished job (its
    `_SUCCESS.json`) is skipped; after a failure the run restarts, workers skip the jobs whose
    export is complete and resume the interrupted one from its last checkpoint. `placement`:
    see `placement_strategy` (None = the config's, PACK by default).
    """
    pending = [j for j in jobs if not j.success_path.is_file()]
    if pending:
        keys = {_group_key(j) for j in pending}
        if len(keys) > 1:
            raise ValueError(f"run_trainings: jobs ask for different worker groups: {sorted(keys)}")
        # Name and storage must not depend on which jobs are still pending: a rerun after a
        # failure has to find the interrupted job's checkpoints under the same run.
        _fit(pending, run_name or jobs[0].run_name, storage_path or jobs[0].storage_path,
             placement)
    pending_ids = {id(j) for j in pending}
    return [_collect(j) if id(j) in pending_ids else TrainResult.load(j.success_path)
            for j in jobs]


def _fit(jobs: list[TrainJob], run_name: str, storage_path: str,
         placement: str | None = None) -> None:
    train = jobs[0].train_config()
    for job in jobs:
        if not Path(job.train_path).exists():
            raise FileNotFoundError(f"training data not found: {job.train_path}")
    # One read of each job's sample ids: the subset resolved here serves the plan and workers.
    configs = [loop_config(j, "ray") for j in jobs]
    planned = {j.run_name: _planned(j, c) for j, c in zip(jobs, configs, strict=True)}
    trainer = make_trainer(train, {"jobs": configs}, run_name, storage_path, placement,
                           [cb for j in jobs for cb in j.callbacks])
    started = time.time()
    result = trainer.fit()
    for job in jobs:
        metrics_path = Path(job.output_dir) / "metrics.json"
        if not metrics_path.is_file():
            raise RuntimeError(f"training run {run_name} ended without {metrics_path} "
                               f"(Ray result error: {getattr(result, 'error', None)})")
        # run_started_at: the worker group's start, its start-up cost
        annotate_metrics(job, planned_steps=planned[job.run_name], run_started_at=started,
                         run_jobs=len(jobs), run_first_job=job is jobs[0])


def _collect(job: TrainJob) -> TrainResult:
    metrics_path = Path(job.output_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    timing = metrics.get("timing") or {}
    if timing:
        metrics["wall_seconds"] = timing["end"] - timing["start"]
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
