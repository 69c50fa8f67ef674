"""Compare methods across model families: mean ± std over seeds of every eval metric.

Reads the child runs of one pipeline invocation (the latest parent run by default) with
`mlflow.search_runs`, so it works on any store the pipeline logged to, local or remote.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.tracking.tracker import KIND_TAG, PARENT_TAG, RunLogger, TrackingTarget

EVAL_PREFIX = "metrics.eval/"
METHOD_ORDER = ("base", "sft", "ignore", "forget")


def mean_std_text(values: list[float], digits: int = 3) -> str:
    """`0.523 ± 0.012`: sample std (ddof=1) over seeds; a single seed has no spread (`± -`)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return f"{mean:.{digits}f} ± -"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """mlflow.search_runs reads the process-wide URI: set it for the call, then restore it.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which outranks the config in
    `resolve_tracking_uri`: left behind, it would send a later run in this process (a second
    pipeline, a sweep) to this store, so the variable is restored exactly too.
    """
    import os

    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def latest_parent_run_id(tracking_uri: str, experiment: str) -> str | None:
    import mlflow

    with _tracking_uri(tracking_uri):
        runs = mlflow.search_runs(experiment_names=[experiment],
                                  filter_string=f"tags.`{KIND_TAG}` = 'parent'",
                                  order_by=["attributes.start_time DESC"], max_results=1,
                                  output_format="list")
    return runs[0].info.run_id if runs else None


def load_eval_runs(tracking_uri: str, experiment: str,
                   parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per run that has eval metrics and a `method` tag, under `parent_run_id`
    (default: the latest parent run; every run of the experiment when there is none)."""
    import mlflow

    parent = parent_run_id or latest_parent_run_id(tracking_uri, experiment)
    filt = f"tags.`{PARENT_TAG}` = '{parent}'" if parent else ""
    with _tracking_uri(tracking_uri):
        runs = mlflow.search_runs(experiment_names=[experiment], filter_string=filt,
                                  max_results=50000, output_format="pandas")
    if runs.empty or "tags.method" not in runs.columns:
        return pd.DataFrame()
    metric_cols = [c for c in runs.columns if c.startswith(EVAL_PREFIX)]
    runs = runs[runs["tags.method"].notna()]
    if not metric_cols or runs.empty:
        return pd.DataFrame()
    runs = runs.dropna(subset=metric_cols, how="all")
    # Group by the model name when runs carry it (two models may share a family).
    family = runs["tags.model"] if "tags.model" in runs.columns else runs["tags.family"]
    out = pd.DataFrame({
        "family": family.fillna(runs.get("tags.family")).astype(str),
        "method": runs["tags.method"].astype(str),
        "seed": runs["tags.seed"].astype(str) if "tags.seed" in runs.columns else "-",
    })
    for col in metric_cols:
        out[col[len(EVAL_PREFIX):]] = runs[col].astype(float)
    return out.reset_index(drop=True)


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(text table, means, stds): rows (family, method), columns `<task>/<metric>`."""
    metrics = [c for c in runs.columns if c not in ("family", "method", "seed")]
    grouped = runs.groupby(["family", "method"], sort=False)
    means = grouped[metrics].mean()
    stds = grouped[metrics].std(ddof=1)
    table = grouped[metrics].agg(lambda s: mean_std_text(list(s)))
    table.insert(0, "seeds", grouped.size())
    order = sorted(table.index, key=lambda fm: (fm[0], _method_key(fm[1])))
    return table.loc[order], means.loc[order], stds.loc[order]


def format_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no evaluated runs to compare)"
    return table.to_string(justify="left")


def bar_charts(means: pd.DataFrame, stds: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """One grouped bar chart per metric: families on x, one bar per method, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    families = list(dict.fromkeys(means.index.get_level_values(0)))
    methods = sorted(set(means.index.get_level_values(1)), key=_method_key)
    width = 0.8 / max(len(methods), 1)
    paths = []
    for metric in means.columns:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(families) + 2), 3.6))
        for j, method in enumerate(methods):
            xs, ys, errs = [], [], []
            for i, fam in enumerate(families):
                if (fam, method) in means.index:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(means.loc[(fam, method), metric])
                    err = stds.loc[(fam, method), metric]
                    errs.append(0.0 if pd.isna(err) else err)
            ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=method)
        ax.set_xticks(range(len(families)), families)
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"compare_{metric.replace('/', '__')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """The comparison table (rows family × method, `mean ± std` text per task metric)."""
    runs = load_eval_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty:
        return pd.DataFrame()
    return summarise(runs)[0]


def cli_compare(tracking_uri: str, experiment: str, out_dir: str | Path | None = None, *,
                parent_run_id: str | None = None, log_to_mlflow: bool = True,
                print_table: bool = True) -> pd.DataFrame:
    """`lethe compare`: print the table, write compare.txt / .csv / PNGs to out_dir and log
    them as artifacts of the parent run (under `compare/`)."""
    runs = load_eval_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty:
        if print_table:
            print(format_table(pd.DataFrame()))
        return pd.DataFrame()
    table, means, stds = summarise(runs)
    text = format_table(table)
    if print_table:
        print(text)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.txt").write_text(text + "\n")
        table.to_csv(out / "compare.csv")
        charts = bar_charts(means, stds, out)
        if log_to_mlflow:
            parent = parent_run_id or latest_parent_run_id(tracking_uri, experiment)
            _log_compare_artifacts(tracking_uri, experiment, parent, [
                out / "compare.txt", out / "compare.csv", *charts])
    return table


def _log_compare_artifacts(tracking_uri: str, experiment: str, parent: str | None,
                           files: list[Path]) -> None:
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
    if created:
        logger.end()


def compare_summary(table: pd.DataFrame) -> dict[str, Any]:
    """The table as JSON-ready rows (for logging with `log_dict`)."""
    return {f"{fam}/{method}": row.to_dict() for (fam, method), row in table.iterrows()}
