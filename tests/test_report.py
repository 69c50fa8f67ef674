"""`lethe report`: the self-contained HTML page, built from a fabricated MLflow store and run
directory (tests/report_run.py, no pipeline run), checked as text; the experiment's MLflow
runs view. The page rendered in headless Chromium: tests/test_report_browser.py.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest
from report_run import METHODS

from orchestrator.config import ExperimentConfig
from orchestrator.tracking.report import write_report
from orchestrator.tracking.report_data import run_root


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ------------------------------------------------------------------------- page as text


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _elements(text: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Elements()
    parser.feed(text)
    return parser.tags


def test_report_is_self_contained_and_has_every_section(report_page):
    cfg, path = report_page
    assert path == run_root(cfg) / "report.html"
    text = path.read_text()
    tags = _elements(text)
    names = [t for t, _ in tags]
    assert "script" not in names and "link" not in names  # nothing fetched, nothing run
    for tag, attrs in tags:
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:60]
            png = base64.b64decode(attrs["src"].split(",", 1)[1])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
        if tag == "a":
            assert attrs["href"].startswith("#")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    for anchor in ("comparison", "partition", "curves", "inspector", "timeline", "config"):
        assert f'id="{anchor}"' in text
    # Comparison: both families and every method, seed spread, paired differences with CIs.
    assert "tiny-llama" in text and "tiny-qwen2" in text
    assert all(f"<th>{m}</th>" in text for m in ("base", *METHODS))
    assert "0.345 ± 0.005" in text  # tiny-llama ignore: 0.340, 0.345, 0.350
    assert "forget − sft" in text and "forget − ignore" in text
    assert re.search(r"\+0\.080 \[\+0\.0\d\d, \+0\.0\d\d\] \*", text)  # paired seeds, no spread
    # Partition: per-kind AUROC, histograms; curves, inspector pages, timeline, config.
    assert "filler" in text and "typo" in text and "0.720" in text
    assert names.count("img") >= 2 + 2 + 2 + 1  # bars, histograms, curves, timeline
    assert names.count("iframe") == 4  # two samples per model
    assert "srcdoc=" in text and "sandbox" in text
    assert "no timeline recorded" not in text and "ray-init" in text
    assert "lethe_synth_mc" in text and "report-test" in text
    assert "seeds:" in text  # the resolved config, verbatim


def test_report_is_logged_to_the_parent_run(report_page):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.compare import latest_parent_run_id
    from orchestrator.tracking.uri import default_sqlite_uri

    cfg, _ = report_page
    uri = default_sqlite_uri(run_root(cfg))
    parent = latest_parent_run_id(uri, cfg.name)
    files = [f.path for f in MlflowClient(uri).list_artifacts(parent, "report")]
    assert "report/report.html" in files


def test_lethe_report_command(report_page, tmp_path, capsys):
    from orchestrator.cli import main

    cfg, _ = report_page
    out = tmp_path / "sent.html"
    assert main(["report", str(run_root(cfg) / "resolved_config.yaml"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "Lethe report: report-test" in out.read_text()


def test_report_without_timeline_or_tracking_says_so(report_page, tmp_path):
    cfg, _ = report_page
    timeline = run_root(cfg) / "timeline.json"
    kept = timeline.rename(tmp_path / "timeline.json")  # the shared run, without its timeline
    try:
        text = write_report(cfg, tmp_path / "r.html", log_to_mlflow=False).read_text()
    finally:
        kept.rename(timeline)
    assert "no timeline recorded" in text and 'id="comparison"' in text
    off = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    text = write_report(off, tmp_path / "off.html", log_to_mlflow=False).read_text()
    assert "tracking disabled" in text and "no evaluated runs" in text
    assert "seeds:" in text  # the config is there even without a store


def test_report_with_a_headline_leads_with_it(report_page, tmp_path):
    """With benchmarks configured, the page follows `lethe compare`: the headline in points
    and its paired differences first, charts for the headline columns only."""
    cfg, _ = report_page
    raw = cfg.to_dict()
    raw["evaluate"]["benchmarks"] = {"MC": {"tasks": ["lethe_synth_mc"], "metric": "acc"},
                                     "MCN": {"tasks": ["lethe_synth_mc"], "metric": "acc_norm"}}
    text = write_report(ExperimentConfig.model_validate(raw), tmp_path / "h.html",
                        log_to_mlflow=False).read_text()
    assert text.index("Headline: average over 2 benchmarks") < text.index("<h3>Methods</h3>")
    assert "38.50 ± 0.50" in text  # tiny-llama forget MC in points
    assert "+8.00 [+8.00, +8.00] *" in text  # forget − sft, in points
    alts = re.findall(r'<img class="fig" src="data:[^"]+" alt="([^"]+)"', text)
    assert [a for a in alts if a.startswith(("compare_", "effect_"))] == [
        "compare_MC", "compare_MCN", "compare_average", "effect_MC", "effect_MCN", "effect_average"]


def test_report_bad_timeline_span_is_named(tmp_path):
    from orchestrator.tracking.report_data import read_timeline

    path = tmp_path / "timeline.json"
    path.write_text(json.dumps([{"stage": "a", "model": "-", "category": "data", "start": 0, "end": 1},
                                {"stage": "b", "start": 5, "end": 2}]))
    spans, notes = read_timeline(path)
    assert [s["stage"] for s in spans] == ["a"]
    assert len(notes) == 1 and "span 1" in notes[0] and "end 2.0 < start 5.0" in notes[0]


# ------------------------------------------------------------------------- MLflow UI view


def test_experiment_opens_as_machine_learning_with_a_runs_view(report_page):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.compare import latest_parent_run_id
    from orchestrator.tracking.tracker import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from orchestrator.tracking.ui import SHARED_VIEW_TAG, runs_view_url
    from orchestrator.tracking.uri import default_sqlite_uri

    cfg, _ = report_page
    uri = default_sqlite_uri(run_root(cfg))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    url = runs_view_url(uri, "http://127.0.0.1:5000/", cfg.name)
    prefix = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey="
    assert url.startswith(prefix)
    key = url[len(prefix):]
    state = json.loads(client.get_experiment(exp.experiment_id).tags[SHARED_VIEW_TAG + key])
    parent = latest_parent_run_id(uri, cfg.name)
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    cols = state["selectedColumns"]
    assert cols[:4] == ["tags.`family`", "tags.`model`", "tags.`method`", "tags.`seed`"]
    assert {"metrics.`eval/lethe_synth_mc/acc`", "metrics.`eval/lethe_synth_mc/acc_norm`"} <= set(cols)
    assert [k["groupByData"] for k in state["groupBy"]["groupByKeys"]] == ["model", "method"]
    assert runs_view_url(uri, "http://127.0.0.1:5000", cfg.name) == url  # same view, same key
    assert runs_view_url(uri, "http://x", "no-such-experiment") is None


def test_report_curves_hold_the_token_losses_and_lambda_per_training_run(report_page):
    """The training-curves section draws, per family, the reference and every method x seed
    run, in config order, with the loss on positive tokens, λ and (forget) the loss on
    negative tokens: the series the trainer reports (training/trainer.py)."""
    from report_run import SEEDS

    from orchestrator.tracking.report_data import collect

    cfg, _ = report_page
    curves = collect(cfg).curves
    labels = [f"{m}/s{s}" for m in METHODS for s in SEEDS]
    for spec in cfg.models:
        mine = [c for c in curves if c.model == spec.name]
        assert [c.label for c in mine] == ["reference", *labels]
        for c in mine[1:]:
            assert {"pos_loss", "lambda"} <= c.series.keys()
            assert ("neg_loss" in c.series) == c.label.startswith("forget/")
            assert [step for step, _ in c.series["lambda"]] == list(range(1, 11))
        forget = next(c for c in mine if c.label == "forget/s0")
        assert forget.series["lambda"][-1][1] == pytest.approx(0.25)


def test_bar_charts_follow_the_config_order_whatever_the_input_order(tmp_path, monkeypatch):
    """Families on x and methods in the legend in config order, for shuffled input rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from orchestrator.tracking.compare import CompareOrder
    from orchestrator.tracking.compare_plots import bar_charts

    rows = [(f, m) for f in ("zeta", "alpha") for m in ("forget", "base", "sft", "ignore")]
    index = pd.MultiIndex.from_tuples(rows, names=["family", "method"])
    means = pd.DataFrame({"mc/acc": [0.3 + 0.01 * i for i in range(len(rows))]}, index=index)
    stds = means * 0.1
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep each figure to look at it
    order = CompareOrder(families=["zeta", "alpha"], methods=["base", "sft", "ignore", "forget"])
    for shuffled in (means, means.sample(frac=1.0, random_state=3)):
        bar_charts(shuffled, stds.loc[shuffled.index], tmp_path, order)
    for fig in figures:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["zeta", "alpha"]
        assert ax.get_legend_handles_labels()[1] == ["base", "sft", "ignore", "forget"]
    assert len(figures) == 2


def test_a_pipeline_run_ends_with_its_report(report_page, capsys, monkeypatch):
    """run_pipeline's last step (pipeline/run.py `_write_report`): the page is written for
    the run's parent and its path printed; a report that fails is a warning, not an error."""
    from types import SimpleNamespace

    from orchestrator.pipeline import run as pipeline_run
    from orchestrator.tracking.compare import latest_parent_run_id
    from orchestrator.tracking.uri import default_sqlite_uri

    cfg, path = report_page
    parent = latest_parent_run_id(default_sqlite_uri(run_root(cfg)), cfg.name)
    track = SimpleNamespace(parent=SimpleNamespace(run_id=parent), enabled=False)
    before = path.stat().st_mtime_ns
    pipeline_run._write_report(cfg, track)
    assert capsys.readouterr().out.strip() == f"[lethe] report: {path}"
    assert path.stat().st_mtime_ns >= before and "Lethe report: report-test" in path.read_text()

    def broken(*args, **kwargs):
        raise ValueError("no figure")

    monkeypatch.setattr("orchestrator.tracking.report.write_report", broken)
    pipeline_run._write_report(cfg, track)
    assert capsys.readouterr().out.strip() == (
        "[lethe] warning: the HTML report could not be written: ValueError: no figure")


def test_report_off_a_terminal_has_no_artifact_bars(report_page, tmp_path, capfd, monkeypatch):
    import os

    from orchestrator import logs

    cfg, _ = report_page
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setattr(logs, "_interactive", False)
    capfd.readouterr()
    write_report(cfg, tmp_path / "quiet.html")
    printed = capfd.readouterr()
    assert "Downloading artifacts" not in printed.err + printed.out
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # restored
