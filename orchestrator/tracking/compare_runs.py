"""The runs `lethe compare` reads: the child runs of one pipeline invocation (the latest
parent run by default), found with `mlflow.search_runs`, so any store the pipeline logged
to works, local or remote. One table of eval metrics per run, one of partition metrics per
family (compare_tables.py turns them into the comparison).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd

from orchestrator.tracking.tracker import KIND_TAG, PARENT_TAG

EVAL_PREFIX = "metrics.eval/"
PARTITION_PREFIX = "metrics.partition/"


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """mlflow.search_runs reads the process-wide URI: set it for the call, then restore it.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which `resolve_tracking_uri`
    takes for a config without tracking.tracking_uri: left behind, it would send a later run
    in this process (a second pipeline, a sweep) to this store, so the variable is restored
    exactly too.
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


def _child_runs(tracking_uri: str, experiment: str, parent_run_id: str | None) -> pd.DataFrame:
    import mlflow

    parent = parent_run_id or latest_parent_run_id(tracking_uri, experiment)
    filt = f"tags.`{PARENT_TAG}` = '{parent}'" if parent else ""
    with _tracking_uri(tracking_uri):
        return mlflow.search_runs(experiment_names=[experiment], filter_string=filt,
                                  max_results=50000, output_format="pandas")


def _family_column(runs: pd.DataFrame) -> pd.Series:
    # Group by the model name when runs carry it (two models may share a family).
    family = runs["tags.model"] if "tags.model" in runs.columns else runs["tags.family"]
    return family.fillna(runs.get("tags.family")).astype(str)


def load_eval_runs(tracking_uri: str, experiment: str,
                   parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per run that has eval metrics and a `method` tag, under `parent_run_id`
    (default: the latest parent run; every run of the experiment when there is none)."""
    runs = _child_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty or "tags.method" not in runs.columns:
        return pd.DataFrame()
    metric_cols = sorted(c for c in runs.columns if c.startswith(EVAL_PREFIX))
    runs = runs[runs["tags.method"].notna()]
    if not metric_cols or runs.empty:
        return pd.DataFrame()
    runs = runs.dropna(subset=metric_cols, how="all")
    out = pd.DataFrame({
        "family": _family_column(runs),
        "method": runs["tags.method"].astype(str),
        "seed": runs["tags.seed"].astype(str) if "tags.seed" in runs.columns else "-",
    })
    for col in metric_cols:
        out[col[len(EVAL_PREFIX):]] = runs[col].astype(float)
    return out.reset_index(drop=True)


def load_partition_runs(tracking_uri: str, experiment: str,
                        parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per family with the partition's noise-detection metrics (columns without the
    `partition/` prefix), from the partition stage runs under the parent."""
    runs = _child_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty or "tags.lethe.stage" not in runs.columns:
        return pd.DataFrame()
    runs = runs[runs["tags.lethe.stage"] == "partition"]
    cols = [c for c in runs.columns if c.startswith(PARTITION_PREFIX)]
    if runs.empty or not cols:
        return pd.DataFrame()
    out = pd.DataFrame({"family": _family_column(runs)})
    for col in cols:
        out[col[len(PARTITION_PREFIX):]] = runs[col].astype(float)
    return out.drop_duplicates("family").reset_index(drop=True)
