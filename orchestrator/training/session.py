"""A training session: one Ray Train run that stays up while a model family's pipeline feeds
it jobs (the reference first, then, once scoring and the partition are done, the
method x seed jobs).

Why: on a small machine a Ray Train run's start-up (controller, worker processes, importing
torch / DeepSpeed, the process group) costs 20-60 s, several times the training compute of a
tiny model. `run_trainings` already shares one run among a stage's jobs; a session also
shares it between the reference stage and the training stage, and can be started before the
jobs exist (`prestart`), so the start-up overlaps the base model's build instead of
following it.

How: the run's workers read jobs from a `JobFeed` actor by index (`feed.get(i)`), so every
rank sees the same sequence, and a worker group restarted after a failure (max_failures)
replays it from index 0, skipping the jobs whose export is complete and resuming the
interrupted one from its checkpoint, as in a fixed-list run. The driver pushes a job and
waits for its metrics.json (written by rank 0 after the export), or for the run to fail.

Only for CPU training: a session holds its workers' resources between the training stages,
and on GPUs those are the devices scoring needs (one GPU would deadlock).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.config import TrainConfig
from orchestrator.training.feed import POLL_S, JobFeed, feed_jobs
from orchestrator.training.job import TrainJob, TrainResult

__all__ = ["JobFeed", "TrainingSession", "feed_jobs", "session_name"]

log = logging.getLogger(__name__)


class TrainingSession:
    """One Ray Train run fed jobs over time; `train(jobs)` blocks until they are exported.

    Jobs must ask for the same worker group (`run_trainings`' rule). Use as a context
    manager, or call `close()`: it ends the run after the jobs already fed.
    """

    def __init__(self, run_name: str, storage_path: str | Path) -> None:
        self.run_name = run_name
        self.storage_path = str(Path(storage_path).resolve())
        self._feed: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group: tuple | None = None
        self._train: TrainConfig | None = None
        self.started_at: float | None = None
        self.jobs_fed = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ driver side

    def prestart(self, train: TrainConfig) -> None:
        """Start the run now, for jobs with `train`'s worker group (its workers then wait
        for the first job)."""
        with self._lock:
            self._start(train)

    def train(self, jobs: list[TrainJob]) -> list[TrainResult]:
        """Feed the jobs not finished yet, wait until each is exported; results in order."""
        from orchestrator.training.stage import _collect, _planned, loop_config

        pending = [j for j in jobs if not j.success_path.is_file()]
        fed: list[tuple[int, bool, float]] = []  # per job: planned steps, first, fed at
        with self._lock:
            for job in pending:
                self._start(job.train_config())
                config = loop_config(job, "ray")
                self._feed.put.remote(config)
                self.jobs_fed += 1
                fed.append((_planned(job, config), self.jobs_fed == 1, time.time()))
        for job, (planned, first, fed_at) in zip(pending, fed, strict=True):
            self._wait_for(job)
            self._annotate(job, planned, first, fed_at)
        pending_ids = {id(j) for j in pending}
        return [_collect(j) if id(j) in pending_ids else TrainResult.load(j.success_path)
                for j in jobs]

    def close(self) -> None:
        """End the run after the jobs fed so far; raises the run's error, if it failed."""
        with self._lock:
            if self._feed is not None:
                self._feed.close.remote()
        if self._thread is not None:
            self._thread.join()
        if self._feed is not None:
            import ray

            ray.kill(self._feed)
            self._feed = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"training session {self.run_name} failed: {error}") from error

    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: end the run and keep the original error, but say what ending it
        # hit too (the run's own failure is often the cause of the original error).
        try:
            self.close()
        except RuntimeError as close_error:
            log.warning("%s (while handling %s: %s)", close_error,
                        getattr(exc_type, "__name__", exc_type), exc)
            if exc is not None and hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"and ending the run: {close_error}")

    # ---------------------------------------------------------------- internals

    def _start(self, train: TrainConfig) -> None:
        from orchestrator.training.stage import worker_group_shape

        key = worker_group_shape(train)
        if self._group is not None:
            if key != self._group:
                raise ValueError(f"training session {self.run_name}: a job asks for worker "
                                 f"group {key}, the session runs {self._group}")
            return
        import ray

        self._group, self._train = key, train
        self._feed = ray.remote(num_cpus=0)(JobFeed).remote()
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._fit, name=f"session-{self.run_name}",
                                        daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        from orchestrator.training.stage import make_trainer

        assert self._train is not None
        try:
            make_trainer(self._train, {"feed": self._feed}, self.run_name,
                         self.storage_path).fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting driver threads
            self._error = exc

    def _wait_for(self, job: TrainJob) -> None:
        metrics = Path(job.output_dir) / "metrics.json"
        while not metrics.is_file():
            if self._thread is None or not self._thread.is_alive():
                error = self._error or RuntimeError("the run ended before this job")
                raise RuntimeError(f"training session {self.run_name}: job {job.run_name} did "
                                   f"not finish: {error}") from self._error
            time.sleep(POLL_S)

    def _annotate(self, job: TrainJob, planned: int, first: bool, fed_at: float) -> None:
        """What `run_trainings` adds to a job's metrics: the plan and the run's start-up.
        A prestarted run's start-up counts from when its first job was fed: before that it
        overlapped other work (the base build), which is the point of prestarting."""
        from orchestrator.training.stage import annotate_metrics

        assert self.started_at is not None
        annotate_metrics(job, planned_steps=planned, run_started_at=max(self.started_at, fed_at),
                         run_jobs=self.jobs_fed, run_first_job=first, run_session=self.run_name)


def session_name(family: str, *keys: str) -> str:
    """A run name stable over reruns of the same inputs (a rerun resumes its checkpoints)."""
    digest = hashlib.sha256("/".join(keys).encode()).hexdigest()[:16]
    return f"{family}-session-{digest}"
