"""Where MLflow data goes, and a fast reachability check for tracking servers.

MLflow's HTTP client retries a dead server with back-off for minutes; checking once, up
front, turns that into a clear error before any training starts.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from orchestrator.config import TrackingConfig

DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"


class TrackingError(RuntimeError):
    """MLflow tracking cannot be used as configured (the message says how to fix it)."""


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """tracking.tracking_uri when the config sets it, else MLFLOW_TRACKING_URI (env), else a
    sqlite file in run_dir.

    The config wins because it is the explicit choice of this experiment, while the variable
    is inherited: from a cluster node (KubeRay pods and the launcher's `ray start` set it to
    the cluster's MLflow server, docs/CLUSTER.md), a shell, or an earlier `mlflow.set_tracking_uri`
    in this process. A job for another server sets `tracking.tracking_uri=...` on its
    entry point."""
    if cfg.tracking_uri and cfg.tracking_uri.strip():
        return cfg.tracking_uri.strip()
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
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


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Authorization header MLflow's client sends for these credentials (as
    mlflow.utils.rest_utils does: username + password as basic auth first, else the token
    as a bearer token); {} without credentials."""
    env = os.environ if environ is None else environ
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    token = env.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def credential_names(environ: Mapping[str, str] | None = None) -> str:
    """Which credential variables the check used (names only, never values)."""
    env = os.environ if environ is None else environ
    if env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD"):
        return "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    return "MLFLOW_TRACKING_TOKEN" if env.get("MLFLOW_TRACKING_TOKEN") else "no credentials"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Raise TrackingError quickly when an http(s) tracking server does not answer, or
    answers but refuses this process's credentials (HTTP 401 / 403: a wrong or missing
    MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN fails here, not at the first log call).

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
    headers = auth_headers()
    # /health is served by `mlflow server` (without authentication, even by the basic-auth
    # app); the REST search is the call that needs credentials, and the fallback for
    # proxies that expose only the API. Both are asked: a live /health says nothing about
    # the credentials.
    probes = [f"{base}/health",
              f"{base}/api/2.0/mlflow/experiments/search?max_results=1"]
    last_error, ok = "", False  # the last probe that answered decides
    for probe in probes:
        try:
            request = urllib.request.Request(probe, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
                ok = resp.status < 500
                last_error = "" if ok else f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                what = "rejected" if headers else "requires"
                raise TrackingError(
                    f"MLflow tracking server at {uri} {what} the credentials (HTTP {exc.code} "
                    f"{exc.reason}; sent: {credential_names()}): set MLFLOW_TRACKING_USERNAME "
                    "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of "
                    "that server in the job's environment") from None
            # < 500, e.g. a 404 from a proxy that serves only one of the paths: alive
            ok = exc.code < 500
            last_error = "" if ok else f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            ok, last_error = False, str(getattr(exc, "reason", exc))
            break  # connection refused / timed out: the second probe would fail the same way
    if ok:
        return
    raise TrackingError(
        f"MLflow tracking server at {uri} is not reachable: {last_error}; {hint}")
