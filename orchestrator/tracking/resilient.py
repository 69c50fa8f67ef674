"""Tracking that never stops training: MLflow logging from a background thread.

`ResilientRun` takes params, metrics and the final status without ever blocking or raising
in the caller (the training loop's rank 0). A background thread sends them in order. When
the server does not answer, the operations stay queued, the thread retries with back-off
(1 s doubling to 30 s; for an http(s) store a 2-second probe decides when to try again, so
MLflow's own minutes-long retry loop is not entered while the server is down) and flushes
everything once the server is back. While it is down, the unsent operations are also kept
in a spool file in the run directory (`mlflow_pending/*.jsonl`), rewritten after each failed
attempt, so even a process killed during the outage loses nothing. `close()` waits a
bounded time for the queue to drain; what is still unsent stays in the spool file and one
warning says to run `lethe sync CONFIG`, which replays every spool file (`sync_pending`).

Replaying is idempotent where it matters: MLflow stores a metric value once per (key,
step, timestamp, value), a param may be logged again with the same value, and a spooled
run creation is replayed once (its placeholder id is mapped to the created run).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.cache import atomic_write_text
from orchestrator.masking import mask_secrets
from orchestrator.tracking.target import (
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    loggable_metrics,
    param_items,
)
from orchestrator.tracking.uri import TrackingError, check_reachable, is_remote

SPOOL_DIRNAME = "mlflow_pending"
PLACEHOLDER = "pending-"
_MAX_BACKOFF_S = 30.0
DEFAULT_FLUSH_TIMEOUT_S = 30.0  # how long close() waits for buffered operations
# REST errors that retrying cannot fix: the operation goes to the spool file at once.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                    "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "PERMISSION_DENIED",
                    "UNAUTHENTICATED"}


def _permanent(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return type(exc).__name__ == "RestException" and code in _PERMANENT_CODES


def _send(client: Any, op: dict[str, Any], run_ids: dict[str, str]) -> None:
    """One operation against MLflow (the same code sends live and replays spooled ops)."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "create":
        if op["placeholder"] in run_ids:  # already created (a replayed spool file)
            return
        exp = client.get_experiment_by_name(op["experiment"])
        exp_id = exp.experiment_id if exp else client.create_experiment(op["experiment"])
        run = client.create_run(exp_id, run_name=op.get("run_name"), tags=op.get("tags") or {})
        run_ids[op["placeholder"]] = run.info.run_id
        return
    run_id = run_ids.get(op["run_id"], op["run_id"])
    if run_id.startswith(PLACEHOLDER):
        raise TrackingError(f"run {run_id} was never created")
    if kind == "metrics":
        items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"]]
        for i in range(0, len(items), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=items[i: i + METRICS_PER_BATCH])
    elif kind == "params":
        items = [Param(k, v) for k, v in op["params"]]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i: i + PARAMS_PER_BATCH])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"]])
    elif kind == "status":
        if op["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=op["status"], end_time=op.get("end_time"))
    else:
        raise TrackingError(f"unknown spooled operation {kind!r}")


class ResilientRun:
    """Non-blocking logging into one MLflow run (created on first contact when `create`)."""

    def __init__(self, tracking_uri: str, *, run_id: str | None = None,
                 create: dict[str, Any] | None = None, spool_dir: str | Path | None = None,
                 label: str = "run", client: Any = None, probe_timeout: float = 2.0,
                 first_backoff: float = 1.0,
                 flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S) -> None:
        if (run_id is None) == (create is None):
            raise ValueError("ResilientRun: give exactly one of run_id or create")
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
        self.uri = tracking_uri
        self.client = client
        self.label = label
        self.probe_timeout = probe_timeout
        self.first_backoff = first_backoff
        self.flush_timeout = flush_timeout
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.spool_file: Path | None = None
        self.run_ids: dict[str, str] = {}
        self._queue: list[dict[str, Any]] = []
        self._inflight: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._stop = False
        self._down = False
        self._warned = False
        self._refused: list[dict[str, Any]] = []
        self.sent = 0
        if create is not None:
            self._ref = PLACEHOLDER + secrets.token_hex(8)
            self._queue.append({"op": "create", "placeholder": self._ref, **create})
        else:
            self._ref = str(run_id)
        self._thread = threading.Thread(target=self._loop, name=f"lethe-mlflow-{label}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None while a run to be created has not reached the server)."""
        return self.run_ids.get(self._ref) if self._ref.startswith(PLACEHOLDER) else self._ref

    def wait_for_run_id(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while self.run_id is None and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return self.run_id

    def _put(self, op: dict[str, Any]) -> None:
        with self._cv:
            self._queue.append(op)
            self._cv.notify()

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Finite numbers only, under MLflow-safe keys (as the driver's RunLogger logs)."""
        now = int(time.time() * 1000)
        items = [[k, v, now, int(step)] for k, v in loggable_metrics(metrics).items()]
        if items:
            self._put({"op": "metrics", "run_id": self._ref, "metrics": items})

    def log_params(self, params: dict[str, Any]) -> None:
        """Masked and capped as the driver's RunLogger logs them (tracking.target)."""
        items = [list(kv) for kv in param_items(params)]
        if items:
            self._put({"op": "params", "run_id": self._ref, "params": items})

    def set_status(self, status: str) -> None:
        end = None if status == "RUNNING" else int(time.time() * 1000)
        self._put({"op": "status", "run_id": self._ref, "status": status, "end_time": end})

    def close(self, status: str | None = "FINISHED", timeout: float | None = None) -> bool:
        """Queue the final status, wait up to `timeout` s (default: `flush_timeout`) for
        everything to be sent. True when all reached MLflow; otherwise the rest is in the
        spool file (one warning says so)."""
        if status is not None:
            self.set_status(status)
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        with self._cv:
            while (self._queue or self._inflight) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.2))
            unsent = self._inflight + self._queue
            self._queue, self._inflight = [], []
            self._stop = True
            self._cv.notify_all()
        if not unsent:
            if self.spool_file is not None:
                self.spool_file.unlink(missing_ok=True)
            return True
        where = self._write_spool(unsent)
        n = sum(len(op.get("metrics", ())) for op in unsent)
        print(f"[lethe] WARNING: MLflow at {mask_secrets(self.uri)} did not take the last "
              f"{len(unsent)} logging operation(s) of {self.label} ({n} metric values); "
              f"nothing is lost: they are in {where}. When the server is back, run "
              f"`lethe sync CONFIG` to send them.", flush=True)
        return False

    # ------------------------------------------------------------------ background thread

    def _loop(self) -> None:
        backoff = self.first_backoff
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                batch = self._take()
            try:
                if self._down and is_remote(self.uri):
                    check_reachable(self.uri, timeout=self.probe_timeout)
                for i, op in enumerate(batch):
                    try:
                        _send(self.client, op, self.run_ids)
                    except Exception as exc:  # noqa: BLE001 - classified below
                        if not _permanent(exc):
                            batch = batch[i:]
                            raise
                        self._spool_permanent(op, exc)
                    self.sent += 1
            except Exception as exc:  # noqa: BLE001 - the server is down: keep and retry
                with self._cv:
                    if self._stop:  # close() has spooled everything already
                        return
                    self._queue[0:0] = batch
                    self._inflight = []
                    self._cv.notify_all()
                    pending = list(self._queue)
                self._write_spool(pending)
                if not self._warned:
                    self._warned = True
                    print(f"[lethe] WARNING: MLflow at {mask_secrets(self.uri)} is unreachable "
                          f"({mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}); "
                          f"{self.label} keeps training, buffers its metrics and retries",
                          flush=True)
                self._down = True
                with self._cv:
                    if not self._stop:
                        self._cv.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            backoff = self.first_backoff
            with self._cv:
                if self._stop:
                    return
                self._inflight = []
                self._cv.notify_all()
                pending = list(self._queue)
            if self._down:
                self._down = False
                print(f"[lethe] MLflow at {mask_secrets(self.uri)} is back; {self.label}'s "
                      f"buffered metrics are sent", flush=True)
            if self.spool_file is not None:
                # what the file holds was sent; keep only what is still queued (and refused)
                if pending or self._refused:
                    self._write_spool(pending)
                else:
                    self.spool_file.unlink(missing_ok=True)
                    self.spool_file = None

    def _take(self) -> list[dict[str, Any]]:
        """Everything queued, as one batch (metrics ops of one run merged)."""
        batch: list[dict[str, Any]] = []
        for op in self._queue:
            last = batch[-1] if batch else None
            if (op["op"] == "metrics" and last is not None and last["op"] == "metrics"
                    and last["run_id"] == op["run_id"]):
                last["metrics"] = last["metrics"] + op["metrics"]
            else:
                batch.append(dict(op))
        self._queue = []
        self._inflight = batch
        return batch

    def _spool_permanent(self, op: dict[str, Any], exc: BaseException) -> None:
        print(f"[lethe] WARNING: MLflow refused a logging operation of {self.label} "
              f"({mask_secrets(str(exc).splitlines()[0])}); kept in the spool file", flush=True)
        self._refused.append({**op, "error": mask_secrets(str(exc))[:500]})

    def _write_spool(self, ops: list[dict[str, Any]]) -> str:
        ops = self._refused + ops
        if self.spool_dir is None:
            return "(no spool folder configured: lost)"
        if self.spool_file is None:
            self.spool_file = self.spool_dir / f"{self.label.replace('/', '_')}-{secrets.token_hex(4)}.jsonl"
        # Placeholders already created are written with their real id.
        resolved = [{**op, "run_id": self.run_ids.get(op.get("run_id", ""), op.get("run_id"))}
                    if "run_id" in op else op for op in ops
                    if not (op["op"] == "create" and op["placeholder"] in self.run_ids)]
        header = {"op": "header", "version": 1, "label": self.label,
                  "tracking_uri": mask_secrets(self.uri), "written_at": time.time()}
        try:
            atomic_write_text(self.spool_file,
                              "\n".join(json.dumps(o) for o in [header, *resolved]) + "\n")
        except OSError as exc:  # a full disk as well as a dead server: say so, keep going
            print(f"[lethe] WARNING: cannot write the MLflow spool file {self.spool_file}: {exc}",
                  flush=True)
        return str(self.spool_file)


def spool_operations(spool_dir: str | Path, label: str, tracking_uri: str,
                     ops: list[dict[str, Any]]) -> Path:
    """Write operations straight to a new spool file (for callers that know the server is
    down and must not wait for it, e.g. marking runs FAILED at the end of a failed run)."""
    path = Path(spool_dir) / f"{label.replace('/', '_')}-{secrets.token_hex(4)}.jsonl"
    header = {"op": "header", "version": 1, "label": label,
              "tracking_uri": mask_secrets(tracking_uri), "written_at": time.time()}
    atomic_write_text(path, "\n".join(json.dumps(o) for o in [header, *ops]) + "\n")
    return path


def reachable(tracking_uri: str, timeout: float = 2.0) -> bool:
    """One quick probe (http(s) stores only; local stores count as reachable)."""
    try:
        check_reachable(tracking_uri, timeout=timeout)
    except TrackingError:
        return False
    return True


def pending_files(run_root: str | Path) -> list[Path]:
    """Every spool file under a run directory (stage folders included)."""
    return sorted(Path(run_root).rglob(f"{SPOOL_DIRNAME}/*.jsonl"))


def sync_pending(run_root: str | Path, tracking_uri: str, client: Any = None) -> dict[str, int]:
    """Replay every spool file under `run_root` into `tracking_uri`; a file is removed once
    all of its operations went through. Raises TrackingError when the server is down."""
    check_reachable(tracking_uri, timeout=5.0)
    if client is None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
    counts = {"files": 0, "operations": 0, "metric_values": 0, "failed_files": 0}
    for path in pending_files(run_root):
        ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        run_ids: dict[str, str] = {}
        try:
            for op in ops:
                if op["op"] == "header":
                    continue
                _send(client, op, run_ids)
                counts["operations"] += 1
                counts["metric_values"] += len(op.get("metrics", ()))
        except Exception as exc:  # noqa: BLE001 - report per file, keep the file
            counts["failed_files"] += 1
            print(f"[lethe] sync: {path}: {mask_secrets(str(exc).splitlines()[0])}; file kept",
                  flush=True)
            continue
        path.unlink()
        counts["files"] += 1
    return counts
