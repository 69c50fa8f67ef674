"""Training stage: collate, per-worker loop (plain), DeepSpeed / DDP engines, Ray Train driver,
export. See docs/ARCHITECTURE.md for the public contract (`run_training`,
`train_loop_per_worker`)."""

from orchestrator.training.job import MlflowTarget, SubsetSpec, TrainJob, TrainResult
from orchestrator.training.loop import NonFiniteLossError, train_loop_per_worker
from orchestrator.training.stage import run_training, run_training_local, run_trainings

__all__ = [
    "MlflowTarget",
    "NonFiniteLossError",
    "SubsetSpec",
    "TrainJob",
    "TrainResult",
    "run_training",
    "run_training_local",
    "run_trainings",
    "train_loop_per_worker",
]
