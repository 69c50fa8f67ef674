"""Rank 0's MLflow curves for one training run: a thin adapter over the tracking layer.

The run itself (target, params masked and capped, finite metrics only, background sending,
spooling for `lethe sync`) is `orchestrator.tracking.worker.open_worker_run`, the same
rules as the driver's `RunLogger`. Ranks other than 0, and jobs without a target, get a
`NullRun`: every call is a no-op, so the loop never branches on tracking.
"""

from __future__ import annotations

from typing import Any

from orchestrator.tracking.resilient import DEFAULT_FLUSH_TIMEOUT_S  # noqa: F401 - re-exported
from orchestrator.tracking.target import TrackingTarget, flatten_config
from orchestrator.tracking.worker import (  # noqa: F401 - re-exported
    CREATE_WAIT_S,
    default_spool_dir,
    open_worker_run,
)


def training_params(method: str, train: dict[str, Any]) -> dict[str, Any]:
    """The params a training run logs: its method and the flattened `train.*` config."""
    return {"method": method, **flatten_config(train, "train")}


class TrainingCurves:
    """`log(metrics, step)` and `finish()` into rank 0's run; `run_id` goes into checkpoints."""

    def __init__(self, target: TrackingTarget | dict[str, Any] | None, *, rank: int,
                 run_name: str, params: dict[str, Any], resume_run_id: str | None = None) -> None:
        self.run = open_worker_run(target if rank == 0 else None, run_name=run_name,
                                   params=params, resume_run_id=resume_run_id)
        # None while the server has not created the run (and for a NullRun)
        self.run_id: str | None = self.run.run_id or None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log_metrics(metrics, step)

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run; True when every metric reached MLflow (else they are spooled)."""
        return self.run.close(status)
