"""Rank 0's MLflow curves for one training run (nested under a parent run when given).

With no target every call is a no-op, so the loop never branches on tracking. After a
resume the same MLflow run continues: its id is kept in the trainer state of the checkpoint.

Tracking never stops training: the calls hand their data to a background sender
(`orchestrator.tracking.resilient.ResilientRun`) and return at once. An unreachable server
means buffered metrics, retries with back-off and a flush when it is back; what has not
been sent when training ends stays in `mlflow_pending/` for `lethe sync`, with a warning.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

# How long the end of training waits for buffered metrics to reach MLflow.
DEFAULT_FLUSH_TIMEOUT_S = 30.0
# How long a new run may take to be created before training goes on without its id.
CREATE_WAIT_S = 15.0


def default_spool_dir(tracking_uri: str) -> Path:
    """Where unsent metrics go when the target names no folder: beside a sqlite store, else
    a folder under the system temp dir (the warning prints it)."""
    from orchestrator.tracking.resilient import SPOOL_DIRNAME
    from orchestrator.tracking.uri import sqlite_path

    db = sqlite_path(tracking_uri)
    base = db.parent if db is not None else Path(tempfile.gettempdir()) / "lethe"
    return base / SPOOL_DIRNAME


class TrainingCurves:
    def __init__(self, target: dict[str, Any] | None, *, rank: int, run_name: str,
                 params: dict[str, Any], resume_run_id: str | None = None) -> None:
        self.run: Any = None
        self.run_id: str | None = None
        if target is None or rank != 0:
            return
        from orchestrator.tracking.resilient import ResilientRun

        uri = target["tracking_uri"]
        spool = target.get("spool_dir") or default_spool_dir(uri)
        self.flush_timeout = float(target.get("flush_timeout_s") or DEFAULT_FLUSH_TIMEOUT_S)
        label = target.get("run_name") or run_name
        existing = resume_run_id or target.get("run_id")
        if existing:  # a resume, or the driver's run: params too unless resuming
            self.run = ResilientRun(uri, run_id=existing, spool_dir=spool, label=label)
            self.run.set_status("RUNNING")
            if resume_run_id is None:
                self.run.log_params(params)
            self.run_id = existing
            return
        tags = {"lethe.stage": "train", **(target.get("tags") or {})}
        if target.get("parent_run_id"):
            tags["mlflow.parentRunId"] = target["parent_run_id"]
        create = {"experiment": target["experiment"], "run_name": label, "tags": tags}
        self.run = ResilientRun(uri, create=create, spool_dir=spool, label=label)
        self.run.log_params(params)
        # The id goes into checkpoints (a resumed run continues the same MLflow run); with
        # the server down it stays None and the spool file creates the run at sync time.
        self.run_id = self.run.wait_for_run_id(CREATE_WAIT_S)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        finite = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self.run.log_metrics(finite, step)

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run; True when every metric reached MLflow (else they are spooled)."""
        if self.run is None:
            return True
        return self.run.close(status, timeout=self.flush_timeout)
