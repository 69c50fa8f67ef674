"""What the training recipe (trainer.py) keeps besides the model: the trainer state a
checkpoint carries, the running sums between reports, and the worker's resolved job.

Plain data, no torch: a checkpoint's `trainer_state.json` is `asdict(TrainerState)`, and
`StepSums` / `ValidationSums` are summed over the ranks field by field
(`Strategy.all_reduce`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from orchestrator.config import ModelSpec, TrainConfig
from orchestrator.training.job import TrainJob

STATE_FILE = "trainer_state.json"
ATTEMPT_FILE = "attempt.json"  # in the job's output folder: see TrainerState.attempt


class NonFiniteLossError(RuntimeError):
    """The loss was nan/inf and train.on_nonfinite is "stop"."""


@dataclass
class TrainerState:
    """What a checkpoint carries besides the engine state (trainer_state.json)."""

    step: int = 0  # optimizer steps done
    skipped_micro_batches: int = 0  # non-finite micro-batches skipped (on_nonfinite="skip")
    tokens: int = 0  # real (non-pad) tokens processed, all ranks
    train_seconds: float = 0.0
    world_size: int = 1
    mlflow_run_id: str | None = None
    job: str | None = None  # run name of the job (several jobs share one Ray Train run)
    # Which attempt at the job's output folder wrote the checkpoint (ATTEMPT_FILE): a folder
    # deleted to force a retrain must not resume from the old attempt's checkpoints, which a
    # training session's storage (stages/sessions/) outlives.
    attempt: str | None = None


@dataclass
class StepSums:
    """Running sums since the last report (summed over the ranks before use)."""

    pos_ce: float = 0.0  # sum of CE over class +1 targets
    n_pos: int = 0
    neg_ce: float = 0.0  # sum of CE over class -1 targets
    n_neg: int = 0
    tokens: int = 0  # real (non-pad) input tokens

    def mean_pos(self) -> float:
        return self.pos_ce / self.n_pos if self.n_pos else float("nan")

    def mean_neg(self) -> float:
        return self.neg_ce / self.n_neg if self.n_neg else float("nan")


@dataclass
class ValidationSums:
    ce: float = 0.0
    n: int = 0


@dataclass
class WorkerJob:
    """A worker's job: the TrainJob plus what the driver resolved once for every worker
    (`training.stage.loop_config`). `config` is that dict as received (the context reads the
    rank's shard and names checkpoints from it)."""

    job: TrainJob
    config: dict[str, Any]
    spec: ModelSpec
    train: TrainConfig
    deepspeed_config: dict[str, Any] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WorkerJob:
        names = {f.name for f in dataclasses.fields(TrainJob)} - {"callbacks"}
        job = TrainJob(**{k: v for k, v in config.items() if k in names})
        return cls(job=job, config=config, spec=job.model_spec(), train=job.train_config(),
                   deepspeed_config=config.get("deepspeed_config"))
