"""The report says why a piece is missing: a partition run whose statistics are absent, not
JSON or not downloadable, and inspector pages the store cannot give, each become a note
naming the run and the store's error (orchestrator/tracking/report_data.py), never a
silent gap."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

STATS = "partition/partition_stats.json"


class FakeStore:
    """An MlflowClient stand-in: `files` maps artifact path -> text (or an exception to raise
    when it is downloaded); `list_error` is raised by list_artifacts."""

    def __init__(self, files: dict[str, object], list_error: Exception | None = None) -> None:
        self.files, self.list_error = files, list_error

    def list_artifacts(self, run_id: str, path: str):
        if self.list_error is not None:
            raise self.list_error
        return [SimpleNamespace(path=p) for p in self.files if str(Path(p).parent) == path]

    def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
        value = self.files[path]
        if isinstance(value, Exception):
            raise value
        out = Path(dst) / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(str(value))
        return str(out)


def _mlflow_error(text: str):
    from mlflow.exceptions import MlflowException

    return MlflowException(text)


@pytest.mark.parametrize(("files", "list_error", "why"), [
    ({}, None, "has no partition/partition_stats.json"),
    ({STATS: "{not json"}, None, "is not valid JSON"),
    ({STATS: "[1, 2]"}, None, "holds a JSON list, not an object"),
    ({STATS: "unused"}, "store down", "could not be listed (MlflowException: store down)"),
    ({STATS: "DOWNLOAD"}, None, "could not be downloaded (MlflowException: connection refused)"),
])
def test_partition_stats_that_cannot_be_read_say_why(tmp_path, files, list_error, why):
    from orchestrator.tracking.report_data import _download_json

    files = {k: (_mlflow_error("connection refused") if v == "DOWNLOAD" else v)
             for k, v in files.items()}
    store = FakeStore(files, _mlflow_error(list_error) if list_error else None)
    value, reason = _download_json(store, "r1", STATS, tmp_path)
    assert value is None and why in reason, reason


def test_readable_partition_stats_come_back(tmp_path):
    from orchestrator.tracking.report_data import _download_json

    value, reason = _download_json(FakeStore({STATS: '{"auroc": 0.8}'}), "r1", STATS, tmp_path)
    assert value == {"auroc": 0.8} and reason is None


def test_an_inspector_page_the_store_cannot_give_is_a_note(tmp_path):
    from orchestrator.tracking.report_data import _inspector_pages

    notes: list[str] = []
    store = FakeStore({"inspect/sample_1.html": "<p>one</p>",
                       "inspect/sample_2.html": _mlflow_error("timed out")})
    pages = _inspector_pages(store, "r1", "tiny", tmp_path, notes)
    assert [p.name for p in pages] == ["sample_1"]
    assert notes == ["tiny: inspector page inspect/sample_2.html of partition run r1 not shown "
                     "(MlflowException: timed out)"]

    notes.clear()
    assert _inspector_pages(FakeStore({}, _mlflow_error("denied")), "r1", "tiny", tmp_path,
                            notes) == []
    assert notes and "could not be listed (MlflowException: denied)" in notes[0]
    notes.clear()
    assert _inspector_pages(FakeStore({}), "r1", "tiny", tmp_path, notes) == [] and notes == []


def test_a_real_store_with_broken_statistics_gives_a_report_note(tmp_path, monkeypatch):
    """Through collect(): a partition run logged with a truncated statistics file is named in
    the notes with the JSON error (it was 'has no partition_stats.json' for any failure)."""
    from report_run import report_config

    from orchestrator.tracking import Tracker
    from orchestrator.tracking.report_data import collect, run_root

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = report_config(tmp_path)
    root = run_root(cfg)
    root.mkdir(parents=True)
    tracker = Tracker.open(cfg, root)
    tracker.start_parent("broken-stats", cfg)
    with tracker.child("tiny-llama/partition", {"family": "llama", "model": "tiny-llama",
                                                "seed": "-", "lethe.stage": "partition"}) as run:
        run.log_text('{"auroc": 0.7', STATS)
        run_id = run.run_id
    tracker.end_parent()

    data = collect(cfg)
    assert data.partitions == []
    (note,) = [n for n in data.notes if run_id in n]
    assert note.startswith(f"tiny-llama: partition run {run_id} {STATS} is not valid JSON (")
