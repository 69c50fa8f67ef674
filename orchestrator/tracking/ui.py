"""The MLflow UI / tracking server over the run directory's store, on 127.0.0.1 only.

`mlflow server` runs with one worker, job execution off and in its own process group:
MLflow 3 leaves helper processes behind otherwise, and `stop_ui` kills the whole group.

Opening on the training runs, not the GenAI overview: MLflow 3.17's UI picks the
experiment page from a `workflowType` query parameter (default "genai", then remembered
in the browser), so the URL printed by `start_ui` names `workflowType=machine_learning` and
the runs tab. It also names a shared view (`viewStateShareKey`): a UI state the MLflow UI
reads from the experiment tag `mlflow.sharedViewState.<key>` (plain JSON is accepted), here
filtering to the latest pipeline run's children with family, model, method, seed and the
headline metrics as columns. Checked against the installed UI bundle
(mlflow/server/js/build/static/js): the share-key loader, the `selectedColumns` keys
(tags.<name> in backquotes) and the search-facet keys (`searchFilter`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from orchestrator.tracking.tracker import KIND_TAG, PARENT_TAG
from orchestrator.tracking.uri import ARTIFACTS_DIRNAME, TrackingError, is_remote, sqlite_path

SHARED_VIEW_TAG = "mlflow.sharedViewState."
RUN_COLUMNS = ("family", "model", "method", "seed", "rho", "lambda_max")  # child-run tags
HEADLINE_MAX = 8  # metric columns in the runs table


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


def _latest_parent(client: Any, experiment: str | None) -> Any | None:
    """The newest pipeline (parent) run, of `experiment` or of any experiment in the store."""
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp is not None else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, f"tags.`{KIND_TAG}` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def headline_metrics(metric_keys: set[str]) -> list[str]:
    """The metrics worth a column: the benchmark headline when there is one, else the eval
    metrics (sorted, at most HEADLINE_MAX)."""
    head = sorted(k for k in metric_keys if k.startswith("headline/"))
    return (head or sorted(k for k in metric_keys if k.startswith("eval/")))[:HEADLINE_MAX]


def runs_view_state(parent_run_id: str, metric_keys: set[str]) -> dict[str, Any]:
    """The MLflow UI state of the runs table: the parent's children, config columns first."""
    return {
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        "selectedColumns": [f"tags.`{t}`" for t in RUN_COLUMNS]
        + [f"metrics.`{m}`" for m in headline_metrics(metric_keys)],
        # One row per (model, method) with metrics averaged over seeds, seeds inside: the
        # comparison table. Without grouping the UI folds every child under its parent.
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": "model"},
                                    {"mode": "tag", "groupByData": "method"}]},
    }


def runs_view_url(tracking_uri: str, base_url: str, experiment: str | None = None) -> str | None:
    """URL of the runs table of the latest pipeline run (saving its shared view state on the
    experiment); None when the store holds no pipeline run yet."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = _latest_parent(client, experiment)
    if parent is None:
        return None
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                                  max_results=10000)
    metric_keys = {k for run in children for k in run.data.metrics}
    state = json.dumps(runs_view_state(parent.info.run_id, metric_keys), sort_keys=True)
    # Content-addressed key: reopening the same view reuses (rewrites) the same tag.
    key = "lethe-" + hashlib.sha256(state.encode()).hexdigest()[:16]
    client.set_experiment_tag(exp_id, SHARED_VIEW_TAG + key, state)
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "viewStateShareKey": key})
    return f"{base_url.rstrip('/')}/#/experiments/{exp_id}/runs?{query}"


def start_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, *,
             artifacts_dir: str | Path | None = None, wait: bool = True,
             timeout: float = 60.0, log_path: str | Path | None = None,
             experiment: str | None = None) -> subprocess.Popen:
    """Start `mlflow server` on the store; prints and returns once it answers (wait=True),
    with the URL of the latest pipeline run's runs table (of `experiment`, else the store's
    newest)."""
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
    # Whatever stops us before the caller holds `proc` (a failed start, Ctrl-C, a SIGTERM
    # turned into KeyboardInterrupt) must not leave the server running in its own group.
    try:
        if wait:
            wait_until_ready(url, proc, timeout)
        print(f"MLflow UI: {url}  (pid {proc.pid})", flush=True)
        try:
            runs = runs_view_url(tracking_uri, url, experiment)
        except Exception as exc:  # noqa: BLE001 - the server is up; the view is a convenience
            print(f"(no runs view: {type(exc).__name__}: {exc})", flush=True)
            runs = None
        if runs is not None:
            print(f"Runs of the latest pipeline run: {runs}", flush=True)
    except BaseException:
        stop_ui(proc)
        raise
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
