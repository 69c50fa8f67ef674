"""Compare methods across model families: mean ± std over seeds, paired effects, noise detection.

Reads the child runs of one pipeline invocation (the latest parent run by default) with
`mlflow.search_runs`, so it works on any store the pipeline logged to, local or remote.
Rows, columns and plot bars follow the config (`CompareOrder`): families in `models`
order, methods as base then `train.methods`, metrics by `evaluate.tasks` order (metrics of
one task alphabetically), so two runs of one config print the same layout.

The parts: reading the runs (compare_runs.py), the tables and the report text
(compare_tables.py), the plots (compare_plots.py); their public names are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.evaluation.benchmarks import AVERAGE
from orchestrator.tracking.compare_plots import bar_charts, effect_chart
from orchestrator.tracking.compare_runs import (
    EVAL_PREFIX,
    PARTITION_PREFIX,
    _tracking_uri,
    latest_parent_run_id,
    load_eval_runs,
    load_partition_runs,
)
from orchestrator.tracking.compare_tables import (
    METHOD_ORDER,
    NOISE_OVERALL,
    CompareOrder,
    effect_table,
    effects,
    format_table,
    headline_table,
    mean_std_text,
    noise_table,
    report_text,
    summarise,
    verdict_lines,
    with_benchmarks,
)
from orchestrator.tracking.power import power_metrics
from orchestrator.tracking.target import TrackingTarget
from orchestrator.tracking.tracker import KIND_TAG, RunLogger

__all__ = [
    "EVAL_PREFIX", "METHOD_ORDER", "NOISE_OVERALL", "PARTITION_PREFIX", "CompareOrder",
    "_tracking_uri", "cli_compare", "compare", "comparison_report", "effect_records_json",
    "effect_table", "effects", "format_table", "headline_table", "latest_parent_run_id",
    "load_eval_runs", "load_partition_runs", "mean_std_text", "noise_table", "report_text",
    "summarise", "summary_metrics", "verdict_lines", "with_benchmarks",
]


# ------------------------------------------------------------------------------ entry points


def compare(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
            order: CompareOrder | None = None) -> pd.DataFrame:
    """The comparison table (rows family × method, `mean ± std` text per task metric)."""
    runs = load_eval_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty:
        return pd.DataFrame()
    return summarise(runs, order)[0]


def comparison_report(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
                      order: CompareOrder | None = None) -> str:
    """What `lethe compare` prints: every table of `report_text`."""
    order = order or CompareOrder()
    runs = load_eval_runs(tracking_uri, experiment, parent_run_id)
    return report_text(runs, load_partition_runs(tracking_uri, experiment, parent_run_id), order)


def effect_records_json(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"family": r["family"], "metric": r["metric"], **r["effect"].to_dict()} for r in records]


def cli_compare(tracking_uri: str, experiment: str, out_dir: str | Path | None = None, *,
                parent_run_id: str | None = None, log_to_mlflow: bool = True,
                print_table: bool = True, order: CompareOrder | None = None) -> pd.DataFrame:
    """`lethe compare`: print the report, write compare.txt / .csv, effects.json, noise.csv
    and the PNGs to out_dir and log them (plus summary metrics) on the parent run."""
    order = order or CompareOrder()
    runs = load_eval_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty:
        if print_table:
            print(format_table(pd.DataFrame()))
        return pd.DataFrame()
    partitions = load_partition_runs(tracking_uri, experiment, parent_run_id)
    table, means, stds = summarise(runs, order)
    text = report_text(runs, partitions, order)
    if print_table:
        print(text)
    if out_dir is None:
        return table
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = effects(runs, order)
    (out / "compare.txt").write_text(text + "\n")
    table.to_csv(out / "compare.csv")
    (out / "effects.json").write_text(json.dumps(effect_records_json(records), indent=2))
    files = [out / "compare.txt", out / "compare.csv", out / "effects.json"]
    noise = noise_table(partitions, order)
    if not noise.empty:
        noise.to_csv(out / "noise_detection.csv")
        files.append(out / "noise_detection.csv")
    # With a headline, its columns are what a reader compares (the paper's per-language
    # TydiQA metrics alone would be 18 charts); every metric stays in the tables.
    plotted = [*order.benchmarks, AVERAGE] if order.benchmarks else list(means.columns)
    scale = 100.0 if order.benchmarks else 1.0  # the headline is read in points
    files += bar_charts(means[plotted], stds[plotted], out, order, scale)
    for metric in plotted:
        chart = effect_chart(records, metric, out, order, scale)
        if chart is not None:
            files.append(chart)
    if log_to_mlflow:
        parent = parent_run_id or latest_parent_run_id(tracking_uri, experiment)
        _log_compare(tracking_uri, experiment, parent, files,
                     summary_metrics(means, stds, records, partitions,
                                     [*order.benchmarks, AVERAGE] if order.benchmarks else []))
    return table


def summary_metrics(means: pd.DataFrame, stds: pd.DataFrame, records: list[dict[str, Any]],
                    partitions: pd.DataFrame, headline: list[str] | None = None) -> dict[str, float]:
    """Flat metrics for the parent run: `compare/<family>/<method>/<col>/{mean,std}`,
    `effect/<family>/<a>-<b>/<col>/{mean,lo,hi,above_noise}` (plus `points` = 100 × mean for
    the headline columns, as the paper reports gains), `noise/<family>/<col>`."""
    out: dict[str, float] = {}
    for (fam, method), row in means.iterrows():
        for col, value in row.items():
            out[f"compare/{fam}/{method}/{col}/mean"] = value
            out[f"compare/{fam}/{method}/{col}/std"] = stds.loc[(fam, method), col]
    for rec in records:
        eff = rec["effect"]
        key = f"effect/{rec['family']}/{eff.a}-{eff.b}/{rec['metric']}"
        out.update({f"{key}/mean": eff.mean, f"{key}/lo": eff.lo, f"{key}/hi": eff.hi,
                    f"{key}/above_noise": float(eff.significant)})
        if rec["metric"] in (headline or []) and eff.mean is not None:
            out[f"{key}/points"] = 100.0 * eff.mean
    out.update(power_metrics(records))
    for row in partitions.to_dict("records"):
        out.update({f"noise/{row['family']}/{k}": v for k, v in row.items() if k != "family"})
    return {k: v for k, v in out.items() if v is not None and not pd.isna(v)}


def _log_compare(tracking_uri: str, experiment: str, parent: str | None,
                 files: list[Path], metrics: dict[str, float]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = parent
    created = False
    if run_id is None:  # no pipeline parent: a standalone `compare` run holds the artifacts
        exp = client.get_experiment_by_name(experiment)
        run_id = client.create_run(exp.experiment_id, run_name="compare",
                                   tags={KIND_TAG: "compare"}).info.run_id
        created = True
    logger = RunLogger(client, TrackingTarget(tracking_uri, experiment, run_id))
    for path in files:
        logger.log_artifact(path, "compare")
    logger.log_metrics(metrics)
    if created:
        logger.end()
