"""Fault drills of the tracking layer: an MLflow outage never stops training, what the server
never took is spooled and synced, and everything that leaves the process is masked
(split from test_faults.py)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_faults import MINIMAL, ROOT, _config_file  # noqa: F401

from orchestrator import cli
from orchestrator.config import config_from_dict


class FlakyClient:
    """An MlflowClient stand-in that is 'down' for the first `fail` calls; `threads` lists the
    thread each call came from."""

    def __init__(self, real, fail: int) -> None:
        self.real, self.fail, self.calls, self.threads = real, fail, 0, []

    def __getattr__(self, name):
        target = getattr(self.real, name)

        def call(*args, **kwargs):
            self.calls += 1
            self.threads.append(threading.get_ident())
            if self.calls <= self.fail:
                raise ConnectionError("connection refused (simulated outage)")
            return target(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, created (schema migrations, ~2 s) once for the module."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "blank.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _store(blank: Path, path: Path) -> str:
    """A fresh store at `path`: a copy of the blank one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blank, path)
    return f"sqlite:///{path}"


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_logging_outage_buffers_retries_and_flushes(tmp_path, capsys, blank_db):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.resilient import ResilientRun

    uri = _store(blank_db, tmp_path / "mlflow.db")
    client = FlakyClient(MlflowClient(uri), fail=3)
    run = ResilientRun(uri, create={"experiment": "e", "run_name": "r", "tags": {}},
                       spool_dir=tmp_path / "spool", label="drill", client=client,
                       first_backoff=0.1)
    before = len(client.threads)
    for step in range(1, 21):
        run.log_metrics({"loss": 1.0 / step}, step)
    # The caller never waits for MLflow: no client call (and so none of the outage's failing
    # calls and back-offs) ran on the caller's thread while it logged.
    during = client.threads[before:]
    assert threading.get_ident() not in during, f"{during.count(threading.get_ident())} calls"
    assert run.close("FINISHED", timeout=30) is True
    assert _history(uri, run.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 21)]
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
    out = capsys.readouterr().out
    assert "unreachable" in out and "is back" in out
    assert not list((tmp_path / "spool").glob("*.jsonl"))  # nothing left behind


def test_metrics_mlflow_never_took_are_spooled_then_synced(tmp_path, capsys, blank_db):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.resilient import SPOOL_DIRNAME, ResilientRun, sync_pending

    uri = _store(blank_db, tmp_path / "mlflow.db")
    exp = MlflowClient(uri).create_experiment("e")
    run_id = MlflowClient(uri).create_run(exp).info.run_id
    down = FlakyClient(MlflowClient(uri), fail=10**9)
    spool = tmp_path / "stages" / "train" / "abc" / SPOOL_DIRNAME
    run = ResilientRun(uri, run_id=run_id, spool_dir=spool, label="m/forget/s0", client=down)
    run.log_params({"lr": 0.001})
    for step in range(1, 11):
        run.log_metrics({"loss": float(step)}, step)
    assert run.close("FINISHED", timeout=1.5) is False
    assert "lethe sync" in capsys.readouterr().out
    assert len(list(spool.glob("*.jsonl"))) == 1
    counts = sync_pending(tmp_path, uri)
    assert counts["files"] == 1 and counts["metric_values"] == 10
    assert _history(uri, run_id, "loss") == [(s, float(s)) for s in range(1, 11)]
    got = MlflowClient(uri).get_run(run_id)
    assert got.data.params == {"lr": "0.001"} and got.info.status == "FINISHED"
    assert not list(spool.glob("*.jsonl"))
    assert sync_pending(tmp_path, uri)["files"] == 0  # replaying twice is a no-op


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_probes(monkeypatch) -> list[str]:
    """The URIs `resilient.reachable` (the quick MLflow probe) is asked about, in order: what
    a test of 'never waits on a dead server' counts instead of timing it."""
    from orchestrator.tracking import resilient

    real, probes = resilient.reachable, []

    def counting(uri, *args, **kwargs):
        probes.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(resilient, "reachable", counting)
    return probes


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server runs in its own process group
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_server_killed_mid_training(tmp_path, capsys, monkeypatch):
    """A real `mlflow server` on 127.0.0.1, SIGKILLed while rank 0 logs: logging never
    blocks, and every metric reaches the store once the server is back."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.ui import start_ui, stop_ui
    from orchestrator.training.mlflow_logging import TrainingCurves

    store = f"sqlite:///{tmp_path}/mlflow.db"
    port = _free_port()
    server = lambda: start_ui(store, port=port, artifacts_dir=tmp_path / "art",  # noqa: E731
                              timeout=180)
    from orchestrator.tracking import resilient

    real_send, senders = resilient._send, []

    def send(*args, **kwargs):  # every MLflow request of a ResilientRun goes through _send
        senders.append(threading.get_ident())
        return real_send(*args, **kwargs)

    monkeypatch.setattr(resilient, "_send", send)
    proc = server()
    try:
        target = {"tracking_uri": f"http://127.0.0.1:{port}", "experiment": "drill",
                  "spool_dir": str(tmp_path / "run" / "mlflow_pending"), "flush_timeout_s": 90}
        curves = TrainingCurves(target, rank=0, run_name="drill", params={"lr": 0.001})
        assert curves.run_id is not None
        for step in range(1, 11):
            curves.log({"loss": 1.0 / step}, step)
        _kill_group(proc)  # the server dies mid-training
        for step in range(11, 31):
            curves.log({"loss": 1.0 / step}, step)
            time.sleep(0.05)
        # Training was never held up by logging: no MLflow request (nor its retries against
        # the dead server) ran on the training thread.
        assert senders and threading.get_ident() not in senders
        proc = server()  # back on the same store
        assert curves.finish() is True  # buffered metrics flushed
        assert _history(store, curves.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 31)]
        assert MlflowClient(store).get_run(curves.run_id).info.status == "FINISHED"
        # (an outage that outlasts training: test_metrics_mlflow_never_took_are_spooled_...)
    finally:
        stop_ui(proc)
    assert proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # stop_ui ended the server's whole process group


def test_failing_run_with_mlflow_down_ends_fast_and_lethe_sync_catches_up(tmp_path, monkeypatch,
                                                                          capsys, blank_db):
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline.tracking_glue import PipelineTracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "faults"
    store = _store(blank_db, root / "mlflow.db")
    exp = MlflowClient(store).create_experiment("faults")
    ids = [MlflowClient(store).create_run(exp).info.run_id for _ in range(3)]

    class Run:
        def __init__(self, run_id):
            self.run_id = run_id

        def end(self, status):  # must not be reached: the server is down
            raise AssertionError("fail() waited on a dead server")

    class DeadTracker:
        enabled = True
        uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there

    track = PipelineTracking(DeadTracker(), config_from_dict({**MINIMAL, "run_dir": str(tmp_path)}),
                             root)
    track.parent = Run(ids[0])
    track._children = {("m", "sft", "0"): Run(ids[1]), ("m", "forget", "0"): Run(ids[2])}
    probes = _count_probes(monkeypatch)
    track.fail()
    assert probes == [DeadTracker.uri]  # one quick probe, not MLflow's retries per run
    assert "FAILED status is kept" in capsys.readouterr().out

    cfg = _config_file(tmp_path, run_dir=str(tmp_path), tracking={"tracking_uri": store})
    assert cli.main(["sync", str(cfg)]) == 0
    assert "3 operations from 1 of 1 file(s)" in capsys.readouterr().out
    assert {MlflowClient(store).get_run(i).info.status for i in ids} == {"FAILED"}
    assert cli.main(["sync", str(cfg)]) == 0
    assert "nothing pending" in capsys.readouterr().out


def test_config_artifacts_and_params_are_masked(tmp_path, monkeypatch, blank_db):
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline.tracking_glue import PipelineTracking
    from orchestrator.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf-secret-value-42")
    store = _store(blank_db, tmp_path / "mlflow.db")
    cfg = config_from_dict({**MINIMAL, "run_dir": str(tmp_path),
                            "data": {"source": "file", "path": "/data/hf-secret-value-42.jsonl"},
                            "evaluate": {"include_path": "https://bob:hunter22@tasks.example/x"}})
    resolved = tmp_path / "resolved_config.yaml"
    resolved.write_text(yaml.safe_dump(cfg.to_dict()))
    track = PipelineTracking(Tracker(store, "faults"), cfg, tmp_path)
    track.start(cfg, resolved)
    client = MlflowClient(store)
    run_id = track.parent.run_id
    texts = []
    for name in ("config.json", "resolved_config.yaml"):
        local = client.download_artifacts(run_id, name, str(tmp_path / "dl"))
        texts.append(Path(local).read_text())
    params = client.get_run(run_id).data.params
    for text in [*texts, json.dumps(params)]:
        assert "hf-secret-value-42" not in text and "hunter22" not in text
    assert "https://***@tasks.example/x" in texts[1]
    assert params["data.path"] == "/data/***.jsonl"


# ----------------------------------------------------------------------------- disk full


def test_driver_logging_after_finished_work_skips_a_dead_server(tmp_path, capsys, monkeypatch):
    from orchestrator.pipeline.tracking_glue import PipelineTracking

    class Untouchable:
        run_id = "r1"

        def __getattr__(self, name):
            raise AssertionError(f"{name} called on a dead server")

    class DeadTracker:
        enabled = True
        uri = f"http://127.0.0.1:{_free_port()}"

    cfg = config_from_dict({**MINIMAL, "run_dir": str(tmp_path)})
    track = PipelineTracking(DeadTracker(), cfg, tmp_path)
    track.parent = Untouchable()
    track.child = lambda *a, **k: Untouchable()
    probes = _count_probes(monkeypatch)
    track.log_train_metrics(cfg.models[0], "sft", 0, {"loss": 1.0})
    track.log_eval({"m/sft/s0": {"t": {"acc": 1.0}}}, {"m/sft/s0": tmp_path})
    track.finish(12.0)
    assert "MLflow unreachable" in track.comparison_text()
    assert probes == [DeadTracker.uri]  # one probe, remembered for 30 s
    out = capsys.readouterr().out
    assert out.count("WARNING: MLflow is unreachable") == 4
