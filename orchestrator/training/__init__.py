"""Training stage: collate, per-worker loop (plain), DeepSpeed / DDP engines, Ray Train driver,
export. See docs/ARCHITECTURE.md for the public contract (`run_training`,
`train_loop_per_worker`).

The names below load on first use: Ray imports this package in processes that only need a
light module of it (the job feed actor, the Ray Train controller via `ray_entry`), and an
eager import here would cost each of them the whole torch / transformers / DeepSpeed stack.
"""

from __future__ import annotations

from orchestrator.lazy import lazy_exports

_EXPORTS = {
    "MlflowTarget": "orchestrator.training.job",
    "SubsetSpec": "orchestrator.training.job",
    "TrainJob": "orchestrator.training.job",
    "TrainResult": "orchestrator.training.job",
    "NonFiniteLossError": "orchestrator.training.loop",
    "train_loop_per_worker": "orchestrator.training.loop",
    "run_training": "orchestrator.training.stage",
    "run_training_local": "orchestrator.training.stage",
    "run_trainings": "orchestrator.training.stage",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
