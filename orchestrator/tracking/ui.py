"""The MLflow UI / tracking server over the run directory's store, on 127.0.0.1 only.

`mlflow server` runs with one worker, job execution off and in its own process group:
MLflow 3 leaves helper processes behind otherwise, and `stop_ui` kills the whole group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.tracking.uri import ARTIFACTS_DIRNAME, TrackingError, is_remote, sqlite_path


def server_command(tracking_uri: str, host: str, port: int,
                   artifacts_dir: str | Path | None = None) -> list[str]:
    if is_remote(tracking_uri):
        raise TrackingError(f"{tracking_uri} is already a server: open it in a browser")
    if artifacts_dir is None:
        db = sqlite_path(tracking_uri)
        base = db.resolve().parent if db is not None else Path.cwd()
        artifacts_dir = base / ARTIFACTS_DIRNAME
    # `python -m mlflow` from this interpreter: the venv's MLflow, whatever PATH says.
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", tracking_uri,
            "--artifacts-destination", str(Path(artifacts_dir).resolve()),
            "--host", host, "--port", str(port), "--workers", "1"]


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll /health until the server answers; raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingError(f"mlflow server exited with code {proc.returncode} before "
                                f"answering on {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1.0) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TrackingError(f"mlflow server did not answer on {url} within {timeout:.0f} s")


def start_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, *,
             artifacts_dir: str | Path | None = None, wait: bool = True,
             timeout: float = 60.0, log_path: str | Path | None = None) -> subprocess.Popen:
    """Start `mlflow server` on the store; prints and returns once it answers (wait=True)."""
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)  # the server serves its backend store, not a client URI
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(server_command(tracking_uri, host, port, artifacts_dir), env=env,
                            stdout=log, stderr=subprocess.STDOUT if log_path else log,
                            start_new_session=True)
    if log_path:
        log.close()  # the child holds its own descriptor
    url = f"http://{host}:{port}"
    if wait:
        try:
            wait_until_ready(url, proc, timeout)
        except TrackingError:
            stop_ui(proc)
            raise
    print(f"MLflow UI: {url}  (pid {proc.pid})", flush=True)
    return proc


def stop_ui(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the server and every helper it started (its whole process group)."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
            time.sleep(0.5)
    if proc.poll() is None:
        proc.wait(timeout=timeout)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
