"""MLflow tracking (the only package that imports mlflow), comparison, UI and inspection."""

from orchestrator.tracking.target import NullRun, RunLabel, TrackingTarget, flatten_config
from orchestrator.tracking.tracker import NullTracker, RunLogger, Tracker, open_run
from orchestrator.tracking.uri import TrackingError, check_reachable, resolve_tracking_uri

__all__ = [
    "NullRun", "NullTracker", "RunLabel", "RunLogger", "Tracker", "TrackingTarget", "TrackingError",
    "check_reachable", "flatten_config", "open_run", "resolve_tracking_uri",
]
