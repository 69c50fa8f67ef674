"""Where MLflow data goes, and a fast reachability check for tracking servers.

MLflow's HTTP client retries a dead server with back-off for minutes; checking once, up
front, turns that into a clear error before any training starts.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.config import TrackingConfig

DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"


class TrackingError(RuntimeError):
    """MLflow tracking cannot be used as configured (the message says how to fix it)."""


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI (env) wins, then tracking.tracking_uri, else a sqlite file in run_dir."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return default_sqlite_uri(run_dir)


def default_sqlite_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve() / DB_FILENAME).as_posix()}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (`sqlite:////abs/path` or `sqlite:///rel/path`)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def local_artifact_location(uri: str, run_dir: str | Path | None = None) -> str | None:
    """For a local store, the artifact root beside it (so nothing lands in ./mlruns);
    None for a server, which decides its own artifact root."""
    if is_remote(uri) or uri.startswith("databricks"):
        return None
    if run_dir is None:
        db = sqlite_path(uri)
        if db is None:
            return None
        run_dir = db.parent
    return (Path(run_dir).resolve() / ARTIFACTS_DIRNAME).as_uri()


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Raise TrackingError quickly when an http(s) tracking server does not answer.

    Local stores (sqlite, file) only need their folder to be creatable.
    """
    hint = ("set MLFLOW_TRACKING_URI or tracking.tracking_uri to a running server, "
            "or tracking.enabled=false")
    if not is_remote(uri):
        db = sqlite_path(uri)
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(f"MLflow store {uri} cannot be created: {exc}; {hint}") from exc
        return
    base = uri.rstrip("/")
    # /health is served by `mlflow server`; the REST search is the fallback for proxies
    # that expose only the API.
    probes = [f"{base}/health",
              f"{base}/api/2.0/mlflow/experiments/search?max_results=1"]
    last_error: str = ""
    for probe in probes:
        try:
            with urllib.request.urlopen(probe, timeout=timeout) as resp:  # noqa: S310
                if resp.status < 500:
                    return
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # alive, but wants credentials: MLflow's env vars handle it
                return
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last_error = str(getattr(exc, "reason", exc))
            break  # connection refused / timed out: the second probe would fail the same way
    raise TrackingError(
        f"MLflow tracking server at {uri} is not reachable: {last_error}; {hint}")
