"""Rank 0's MLflow curves for one training run (nested under a parent run when given).

With no target every call is a no-op, so the loop never branches on tracking. After a
resume the same MLflow run continues: its id is kept in the trainer state of the checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import Any


class TrainingCurves:
    def __init__(self, target: dict[str, Any] | None, *, rank: int, run_name: str,
                 params: dict[str, Any], resume_run_id: str | None = None) -> None:
        self.client = None
        self.run_id: str | None = None
        if target is None or rank != 0:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=target["tracking_uri"])
        if resume_run_id is not None:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return
        if target.get("run_id"):  # log into the driver's run, params included
            self.run_id = target["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_params(params)
            return
        exp = self.client.get_experiment_by_name(target["experiment"])
        exp_id = exp.experiment_id if exp else self.client.create_experiment(target["experiment"])
        tags = {"lethe.stage": "train", **(target.get("tags") or {})}
        if target.get("parent_run_id"):
            tags["mlflow.parentRunId"] = target["parent_run_id"]
        run = self.client.create_run(exp_id, run_name=target.get("run_name") or run_name, tags=tags)
        self.run_id = run.info.run_id
        self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(flat), 100):  # MLflow caps params per batch
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
