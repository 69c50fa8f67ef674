"""`lethe report`: one self-contained HTML page for a pipeline run, to send to a colleague.

Sections: the comparison (mean ± std over seeds, paired differences with confidence
intervals, bar and effect charts), the partition (noise detection per family and noise
kind, score histograms), training curves (loss on positive / negative tokens, λ, validation
loss), token-inspector samples, the stage timeline and the resolved config. Images are
PNG data URIs and the CSS is inline: the file opens anywhere, offline, with no scripts.

    write_report(cfg) -> runs/<name>/report.html   (also logged to the parent MLflow run)
"""

from __future__ import annotations

import contextlib
import html
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.cache import atomic_write_text
from orchestrator.config import ExperimentConfig
from orchestrator.tracking.report_data import ReportData, collect, run_root
from orchestrator.tracking.report_plots import (
    curves_uri,
    file_uri,
    histogram_uri,
    timeline_uri,
)

REPORT_FILE = "report.html"
PARTITION_KEYS = ("n_tokens", "n_positive", "n_negative", "positive_fraction", "threshold",
                  "n_noise", "noise_fraction", "auroc", "precision", "recall", "f1")

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5em 2em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-bottom: 0.3em; }
nav a { margin-right: 1em; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0 1em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.data th { background: #f3f3f3; }
table.data td:first-child, table.data th:first-child { text-align: left; }
.meta td { padding: 1px 12px 1px 0; font-size: 0.9em; }
.note { background: #fff7e0; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; margin: 0.4em 0; }
.legend { color: #555; font-size: 0.85em; }
img.fig { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
iframe.inspect { width: 100%; height: 240px; border: 1px solid #ccc; }
pre.config { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.verdict { font-family: monospace; font-size: 0.85em; white-space: pre-wrap; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    if df is None or df.empty:
        return '<p class="legend">(nothing to show)</p>'
    return df.to_html(classes="data", border=0, na_rep="-", escape=True,
                      float_format=lambda v: floats.format(v))


def _img(uri: str | None, alt: str) -> str:
    return "" if uri is None else f'<img class="fig" src="{uri}" alt="{_esc(alt)}">'


def _notes(notes: list[str]) -> str:
    return "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)


# ----------------------------------------------------------------------------- sections


def _header(data: ReportData, cfg: ExperimentConfig) -> str:
    p = data.parent
    tags = p.get("tags", {})
    started = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p["start_time"] / 1000))
               if p.get("start_time") else "-")
    wall = p.get("metrics", {}).get("pipeline_wall_s")
    rows = [("experiment", data.experiment), ("pipeline run", f"{p.get('run_name', '-')} "
                                                              f"({data.parent_run_id or '-'})"),
            ("status", p.get("status", "-")), ("started", started),
            ("wall time", f"{wall:.1f} s" if isinstance(wall, float) else "-"),
            ("lethe", f"{tags.get('lethe.version', '-')} @ {tags.get('lethe.git_commit', '-')}"),
            ("models", ", ".join(f"{m.name} ({m.family})" for m in cfg.models)),
            ("methods", ", ".join(cfg.train.methods)),
            ("seeds", ", ".join(str(s) for s in (cfg.seeds or [cfg.train.seed]))),
            ("tracking store", data.tracking_uri or "disabled"),
            ("written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))]
    meta = "".join(f"<tr><td><b>{_esc(k)}</b></td><td>{_esc(v)}</td></tr>" for k, v in rows)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("comparison", "Comparison"), ("partition", "Partition"), ("curves", "Training curves"),
        ("inspector", "Token inspector"), ("timeline", "Timeline"), ("config", "Config")))
    return (f"<h1>Lethe report: {_esc(data.name)}</h1>"
            f'<table class="meta">{meta}</table><nav>{nav}</nav>{_notes(data.notes)}')


def _comparison(data: ReportData, cfg: ExperimentConfig, tmp: Path) -> str:
    """Laid out as `lethe compare` prints it (compare.report_text): with benchmarks
    configured, the headline in points and its paired differences first, then every metric."""
    from orchestrator.evaluation.benchmarks import AVERAGE
    from orchestrator.tracking.compare import (
        CompareOrder,
        effect_table,
        effects,
        headline_table,
        summarise,
        verdict_lines,
    )
    from orchestrator.tracking.compare_plots import bar_charts, effect_chart

    out = ['<h2 id="comparison">Comparison</h2>']
    runs = data.eval_runs
    if runs is None or runs.empty:
        return out[0] + '<p class="note">no evaluated runs under this pipeline run</p>'
    order = CompareOrder.from_config(cfg)
    table, means, stds = summarise(runs, order)
    head_cols = [*order.benchmarks, AVERAGE] if order.benchmarks else []
    records = effects(runs, order)
    legend = (f'<p class="legend">Mean over paired seeds (a seed fixes data order and init for '
              f'every method) [{order.confidence:.0%} Student-t CI]; * = the interval excludes 0: '
              f'the difference is above the seed noise; one seed gives no interval.</p>')
    methods = ['<h3>Methods</h3><p class="legend">Each cell: mean ± sample std over seeds '
               '(one seed: “± -”).</p>',
               _table(table.drop(columns=[c for c in head_cols if c in table.columns]))]
    if order.benchmarks:
        out += [f"<h3>Headline: average over {len(order.benchmarks)} benchmarks, in points "
                "(100 × metric)</h3>", _table(headline_table(runs, order))]
        diffs = effect_table(records, scale=100.0, digits=2, metrics=head_cols)
        verdicts = verdict_lines(records, head_cols)
    else:
        out += methods
        diffs = effect_table(records)
        verdicts = verdict_lines(records)
    out.append("<h3>Paired differences</h3>")
    if diffs.empty:
        out.append('<p class="legend">(no pair of compared methods ran: nothing to difference)</p>')
    else:
        out += [legend, _table(diffs),
                f'<div class="verdict">{_esc(chr(10).join(verdicts))}</div>']
    if order.benchmarks:
        out += methods
    # Charts as compare_plots draws them: the headline columns only when there is one.
    plotted = head_cols or list(means.columns)
    out.append("<h3>Charts</h3>")
    for path in bar_charts(means[plotted], stds[plotted], tmp, order):
        out.append(_img(file_uri(path), path.stem))
    for metric in plotted:
        chart = effect_chart(records, metric, tmp, order, 100.0 if head_cols else 1.0)
        if chart is not None:
            out.append(_img(file_uri(chart), chart.stem))
    return "".join(out)


def _partition(data: ReportData, cfg: ExperimentConfig) -> str:
    from orchestrator.tracking.compare import CompareOrder, noise_table

    out = ['<h2 id="partition">Partition</h2>']
    if not data.partitions:
        return out[0] + '<p class="note">no partition statistics recorded</p>'
    noise = noise_table(data.partition_runs, CompareOrder.from_config(cfg))
    if not noise.empty:
        out += ['<p class="legend">Noise detection per family: the negative set against the '
                'ground-truth noise tokens (AUROC of −score as a noise detector, precision / '
                'recall / F1 of the negative set); per kind: recall, and AUROC of that kind\'s '
                'tokens against clean tokens.</p>', _table(noise)]
    for view in data.partitions:
        stats = view.stats
        out.append(f"<h3>{_esc(view.model)} ({_esc(view.family)})</h3>")
        summary = pd.DataFrame([{k: stats[k] for k in PARTITION_KEYS if stats.get(k) is not None}])
        out.append(_table(summary.rename(index={0: view.model}), "{:.4g}"))
        by_kind = stats.get("noise_by_kind") or {}
        if by_kind:
            kinds = pd.DataFrame.from_dict(by_kind, orient="index")
            kinds.index.name = "noise kind"
            out.append(_table(kinds, "{:.3f}"))
        out.append(_img(histogram_uri(stats, f"{view.model}: score histogram by class"),
                        f"{view.model} score histogram"))
    return "".join(out)


def _section(anchor: str, title: str, parts: list[str], empty: str, legend: str) -> str:
    """A section: its heading, then its legend and parts, or a note that it has none."""
    head = f'<h2 id="{anchor}">{title}</h2>'
    if not parts:
        return head + f'<p class="note">{empty}</p>'
    return head + f'<p class="legend">{legend}</p>' + "".join(parts)


def _sweep(data: ReportData) -> str:
    """A `lethe tune` run: the trial table and the metric over (lambda_max, rho)."""
    if not data.sweep_table and data.sweep_png_uri is None:
        return ""
    parts = [_img(data.sweep_png_uri, "sweep metric over lambda_max and rho"),
             f'<pre class="config">{_esc(data.sweep_table)}</pre>']
    return _section("sweep", "Tune sweep", parts, "", "The sweep's metric per trial against "
                    "λ's ceiling and rho (right: the (λ, rho) map, colour = the metric), then "
                    "every trial, best first.")


def _curves(data: ReportData) -> str:
    parts = [_img(curves_uri(model, [c for c in data.curves if c.model == model]),
                  f"{model} training curves")
             for model in dict.fromkeys(c.model for c in data.curves)]
    return _section("curves", "Training curves", parts, "no training curves recorded",
                    "Mean CE on positive and negative tokens per report interval, the forgetting "
                    "weight λ, and the validation loss on clean held-out data; one line per "
                    "training run (reference = the SFT reference model).")


def _inspector(data: ReportData) -> str:
    # srcdoc keeps each page's styles apart from the report's; the sandbox allows no scripts.
    parts = [f"<h3>{_esc(page.model)}: {_esc(page.name)}</h3>"
             f'<iframe class="inspect" sandbox="allow-same-origin" title="{_esc(page.name)}" '
             f'srcdoc="{_esc(page.html)}"></iframe>' for page in data.inspector]
    return _section("inspector", "Token inspector", parts, "no token-inspector samples recorded",
                    "Response tokens coloured by score (blue: the reference learned it, red: it "
                    "got worse); + positive, − negative; ! ground-truth noise.")


def _timeline(data: ReportData) -> str:
    out = ['<h2 id="timeline">Stage timeline</h2>']
    if data.timeline is None:
        return out[0] + '<p class="note">no timeline recorded</p>'
    spans = data.timeline
    if not spans:
        return out[0] + '<p class="note">the timeline holds no spans</p>'
    t0 = min(s["start"] for s in spans)
    frame = pd.DataFrame(spans)
    frame["seconds"] = frame["end"] - frame["start"]
    table = frame.pivot_table(index="stage", columns="category", values="seconds",
                              aggfunc="sum", fill_value=0.0, sort=False)
    first = frame.groupby("stage", sort=False)["start"].min() - t0
    last = frame.groupby("stage", sort=False)["end"].max() - t0
    table.insert(0, "to (s)", last)
    table.insert(0, "from (s)", first)
    wall = max(s["end"] for s in spans) - t0
    out += [f'<p class="legend">Seconds per stage and category, summed over models (parallel '
            f'work counts once per model); wall {wall:.1f} s from the first span.</p>',
            _img(timeline_uri(spans), "stage timeline"), _table(table.sort_values("from (s)"), "{:.1f}")]
    return "".join(out)


def render(data: ReportData, cfg: ExperimentConfig) -> str:
    """The report page for already collected data."""
    with tempfile.TemporaryDirectory(prefix="lethe-report-") as tmp:
        body = "".join([
            _header(data, cfg),
            _comparison(data, cfg, Path(tmp)),
            _sweep(data),
            _partition(data, cfg),
            _curves(data),
            _inspector(data),
            _timeline(data),
            f'<h2 id="config">Resolved config</h2><pre class="config">{_esc(data.config_yaml)}</pre>',
        ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Lethe report: {_esc(data.name)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


@contextlib.contextmanager
def _no_artifact_bars() -> Iterator[None]:
    """Off a terminal (`lethe report > log`), no MLflow bar per artifact moved: the report
    downloads one per partition and inspector page. A user's own setting wins."""
    from orchestrator.logs import interactive

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if interactive() or key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def write_report(cfg: ExperimentConfig, out: str | Path | None = None, *,
                 parent_run_id: str | None = None, log_to_mlflow: bool = True) -> Path:
    """Write the report of `cfg`'s latest (or the given) pipeline run; default path
    runs/<name>/report.html. Logged as `report/report.html` on the parent run."""
    with _no_artifact_bars():
        data = collect(cfg, parent_run_id)
        path = Path(out) if out is not None else run_root(cfg) / REPORT_FILE
        atomic_write_text(path, render(data, cfg))
        if log_to_mlflow and data.tracking_uri and data.parent_run_id:
            from mlflow.tracking import MlflowClient

            from orchestrator.tracking.target import TrackingTarget
            from orchestrator.tracking.tracker import RunLogger

            logger = RunLogger(MlflowClient(tracking_uri=data.tracking_uri),
                               TrackingTarget(data.tracking_uri, data.experiment,
                                              data.parent_run_id))
            logger.log_artifact(path, "report")
    return path
