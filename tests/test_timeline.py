"""The pipeline timeline: spans per stage, and the share of wall time with no model compute
(parallel compute counted once)."""

from __future__ import annotations

import json

from orchestrator.pipeline.timeline import Timeline, union_seconds


def test_union_counts_overlapping_compute_once():
    assert union_seconds([(0, 10), (5, 15), (20, 25)]) == 20
    assert union_seconds([]) == 0


def test_summary_training_and_scoring_spans(tmp_path):
    tl = Timeline(start=1000.0)
    tl.add("ray-init", "-", "startup", 1000, 1010)
    # a training job timed inside its worker (training/loop.py `timing`), first job of its run
    tl.add_training("train", "a", {"timing": {"start": 1020, "ready": 1025, "trained": 1065,
                                              "end": 1067},
                                   "run_started_at": 1012, "run_first_job": True})
    # a second family trains at the same time: its compute overlaps
    tl.add_training("train", "b", {"timing": {"start": 1030, "ready": 1031, "trained": 1061}})
    tl.add_scoring("score", "a", 1070, {"finished_at": 1090, "timings": {
        "actors_ready_s": 8, "score_wall_s": 12, "actor_score_s": 10}})
    summ = tl.summary(end=1100)
    assert summ["wall_seconds"] == 100
    assert summ["compute_seconds"] == 40 + 10  # [1025, 1065] and [1078, 1088]
    assert abs(summ["overhead_fraction"] - 0.5) < 1e-9
    train = summ["stages"]["train"]
    assert train["startup"] == (1020 - 1012) + 5 + 1 and train["export"] == 2
    assert summ["stages"]["score"]["startup"] == 8
    text = tl.text(end=1100)
    assert "non-compute overhead 50 %" in text and "ray-init" in text
    tl.write(tmp_path / "timeline.json", end=1100)
    body = json.loads((tmp_path / "timeline.json").read_text())
    assert len(body["spans"]) == 1 + 4 + 2 + 2


def test_span_records_failures_too(capsys):
    tl = Timeline(start=0.0)
    try:
        with tl.span("reference", "m"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert tl.spans[0].stage == "reference"
    assert "failed" in capsys.readouterr().out


def test_evaluation_load_is_startup_and_lm_eval_is_compute(monkeypatch):
    """lm-eval's forward passes are model compute; loading the model is start-up."""
    from orchestrator.pipeline import evaluate_stage, timeline

    tl = timeline.begin(0.0)
    evaluate_stage._add_to_timeline({
        "tiny-llama/base/-": {"start": 10.0, "loaded": 12.0, "evaluated": 30.0},
        "tiny-qwen/sft/s0": {"start": 11.0, "loaded": 14.0, "evaluated": 20.0},
        "tiny-qwen/forget/s0": {"start": 11.0},  # failed before loading: no span
    })
    summ = tl.summary(end=40.0)
    assert summ["compute_seconds"] == 18.0  # [12, 30] covers [14, 20]
    assert summ["stages"]["evaluate"]["startup"] == 2.0 + 3.0
    assert {s.model for s in tl.spans} == {"tiny-llama", "tiny-qwen"}

