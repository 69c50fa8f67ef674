"""Rank 0's MLflow run inside a training worker: the same target, params and metric rules
as the driver's `RunLogger` (orchestrator.tracking.target), sent by a background thread.

Tracking never stops training: every call hands its data to `ResilientRun` and returns at
once. An unreachable server means buffered metrics, retries with back-off and a flush when
it is back; what has not been sent when training ends stays in `mlflow_pending/` for
`lethe sync`, with a warning. After a resume the same MLflow run continues (its id is kept
in the checkpoint's trainer state and passed back as `resume_run_id`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from orchestrator.tracking.resilient import DEFAULT_FLUSH_TIMEOUT_S, SPOOL_DIRNAME, ResilientRun
from orchestrator.tracking.target import NullRun, TrackingTarget
from orchestrator.tracking.uri import sqlite_path

# How long a new run may take to be created before training goes on without its id.
CREATE_WAIT_S = 15.0
STAGE_TAG = "lethe.stage"


def default_spool_dir(tracking_uri: str) -> Path:
    """Where unsent metrics go when the target names no folder: beside a sqlite store, else
    a folder under the system temp dir (the warning prints it)."""
    db = sqlite_path(tracking_uri)
    base = db.parent if db is not None else Path(tempfile.gettempdir()) / "lethe"
    return base / SPOOL_DIRNAME


def open_worker_run(target: TrackingTarget | dict[str, Any] | None, *, run_name: str,
                    params: dict[str, Any], resume_run_id: str | None = None,
                    ) -> ResilientRun | NullRun:
    """The run rank 0 logs its curves into; a `NullRun` when there is no target.

    With `target.run_id` (the driver's run) or `resume_run_id` (a resumed training) the run
    exists: it is marked RUNNING, and gets `params` unless resuming. Otherwise a run named
    `target.run_name or run_name` is created under `target.parent_run_id`; its id is
    awaited for CREATE_WAIT_S (None while the server is down: the spool file creates the
    run at `lethe sync` time).
    """
    target = TrackingTarget.coerce(target)
    if target is None:
        return NullRun()
    uri = target.tracking_uri
    spool = target.spool_dir or default_spool_dir(uri)
    label = target.run_name or run_name
    flush = float(target.flush_timeout_s or DEFAULT_FLUSH_TIMEOUT_S)
    existing = resume_run_id or target.run_id
    if existing:
        run = ResilientRun(uri, run_id=existing, spool_dir=spool, label=label, flush_timeout=flush)
        run.set_status("RUNNING")
        if resume_run_id is None:
            run.log_params(params)
        return run
    tags = {STAGE_TAG: "train", **target.tags}
    if target.parent_run_id:
        tags["mlflow.parentRunId"] = target.parent_run_id
    create = {"experiment": target.experiment, "run_name": label, "tags": tags}
    run = ResilientRun(uri, create=create, spool_dir=spool, label=label, flush_timeout=flush)
    run.log_params(params)
    run.wait_for_run_id(CREATE_WAIT_S)
    return run
