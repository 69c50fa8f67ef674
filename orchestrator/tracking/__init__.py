"""MLflow tracking (the only package that imports mlflow), comparison, UI and inspection."""

from orchestrator.tracking.tracker import (
    NullRun,
    NullTracker,
    RunLogger,
    Tracker,
    TrackingTarget,
    flatten_config,
    open_run,
)
from orchestrator.tracking.uri import TrackingError, check_reachable, resolve_tracking_uri

__all__ = [
    "NullRun", "NullTracker", "RunLogger", "Tracker", "TrackingTarget", "TrackingError",
    "check_reachable", "flatten_config", "open_run", "resolve_tracking_uri",
]
