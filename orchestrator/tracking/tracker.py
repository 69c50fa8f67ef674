"""A small MLflow API for the pipeline: one parent run per pipeline invocation, child runs
per (family, method, seed) and per stage, and a JSON-serialisable `TrackingTarget` that
Ray workers use to log into a run the driver created.

Everything goes through `MlflowClient` with an explicit tracking URI (no process-global
state), except `open_run`, which also activates the run for MLflow's fluent API so code
inside a worker can call `mlflow.log_metric` directly.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orchestrator
from orchestrator import masking
from orchestrator.config import ExperimentConfig
from orchestrator.tracking.target import (
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    NullRun,
    TrackingTarget,
    flatten_config,
    loggable_metrics,
    param_items,
)
from orchestrator.tracking.uri import (
    check_reachable,
    local_artifact_location,
    resolve_tracking_uri,
)

# Tags every (family, method, seed) run carries, so runs can be filtered and grouped.
RUN_TAG_KEYS = ("family", "method", "rho", "lambda_max", "lambda_schedule", "negative_term", "seed")
KIND_TAG = "lethe.kind"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's experiment type ("custom_model_development" = "Machine learning", not GenAI):
# earlier 3.x UIs choose the page from it; 3.17 from the URL's workflowType, which
# ui.runs_view_url sets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# ----------------------------------------------------------------------------- helpers


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    repo = Path(repo_dir) if repo_dir else Path(orchestrator.__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunLogger:
    """Logging into one MLflow run (parent, child or a worker's view of a child)."""

    def __init__(self, client: Any, target: TrackingTarget) -> None:
        self.client = client
        self.target = target

    @property
    def run_id(self) -> str:
        return self.target.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in param_items(params)]
        for i in range(0, len(items), PARAMS_PER_BATCH):  # MLflow rejects > 100 per batch
            self.client.log_batch(self.run_id, params=items[i: i + PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in param_items({k: v for k, v in tags.items()
                                                       if v is not None})]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i: i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numeric, finite values only (NaN would break comparisons); one batch request."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in loggable_metrics(metrics).items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i: i + METRICS_PER_BATCH])

    def log_eval_metrics(self, results: dict[str, dict[str, Any]], prefix: str = "eval") -> None:
        """{task: {metric: value}} -> metrics `eval/<task>/<metric>`."""
        self.log_metrics({f"{prefix}/{task}/{metric}": value
                          for task, metrics in results.items() for metric, value in metrics.items()})

    def log_partition_stats(self, stats: dict[str, Any], prefix: str = "partition",
                            histogram: str | Path | None = None) -> None:
        """Scalars as metrics `partition/<key>`, the whole report as JSON, and the histogram
        the partition stage drew (`histogram.png`, orchestrator/partition/plots.py)."""
        self.log_metrics({f"{prefix}/{k}": v for k, v in stats.items()})
        self.log_dict(stats, f"{prefix}/partition_stats.json")
        if histogram is not None and Path(histogram).is_file():
            self.log_artifact(histogram, prefix)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        # masked: a config holds tracking URIs, paths and hub ids that may carry credentials
        self.client.log_text(self.run_id, json.dumps(masking.mask_obj(data), indent=2,
                                                     sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, masking.mask_secrets(text), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str, close: bool = True) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)
        if close:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


# ----------------------------------------------------------------------------- trackers


class Tracker:
    """MLflow tracking for one experiment (one per experiment config name)."""

    enabled = True

    def __init__(self, tracking_uri: str, experiment: str, *,
                 artifact_location: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the tag existed
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG,
                                               EXPERIMENT_KIND)
        self.parent: RunLogger | None = None

    @classmethod
    def open(cls, cfg: ExperimentConfig, run_dir: str | Path, *,
             check: bool = True) -> Tracker | NullTracker:
        """The tracker a config asks for; an unreachable server raises TrackingError now."""
        if not cfg.tracking.enabled:
            return NullTracker()
        uri = resolve_tracking_uri(cfg.tracking, run_dir)
        if check:
            check_reachable(uri)
        return cls(uri, cfg.tracking.experiment or cfg.name,
                   artifact_location=local_artifact_location(uri, run_dir))

    def _create_run(self, run_name: str, tags: dict[str, str]) -> RunLogger:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        return RunLogger(self.client, TrackingTarget(
            tracking_uri=self.uri, experiment=self.experiment, experiment_id=self.experiment_id,
            run_id=run.info.run_id, run_name=run_name, parent_run_id=tags.get(PARENT_TAG),
            tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")}))

    def start_parent(self, run_name: str, config: ExperimentConfig | None = None) -> RunLogger:
        """The pipeline's run: the flattened config as params, git commit and version tags."""
        tags = {KIND_TAG: "parent", "lethe.version": orchestrator.__version__}
        commit = git_commit()
        if commit:
            tags["lethe.git_commit"] = commit
        if config is not None:
            tags["lethe.config_name"] = config.name
        self.parent = self._create_run(run_name, tags)
        if config is not None:
            # Params come only from the config: never from the environment.
            self.parent.log_params(flatten_config(config.to_dict()))
            self.parent.log_dict(config.to_dict(), "config.json")
        return self.parent

    def start_child(self, run_name: str, tags: dict[str, Any] | None = None) -> RunLogger:
        """A run nested under the parent (when one was started); the caller ends it.
        Use this for runs handed to Ray workers; `child` for runs that end in a block."""
        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        tags.setdefault(KIND_TAG, "run" if "method" in tags else "stage")
        if self.parent is not None:
            tags[PARENT_TAG] = self.parent.run_id
        return self._create_run(run_name, tags)

    @contextmanager
    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> Iterator[RunLogger]:
        """A nested run for a (family, method, seed) or a stage; FAILED if the block raises."""
        run = self.start_child(run_name, tags)
        try:
            yield run
        except BaseException:
            run.end("FAILED")
            raise
        run.end("FINISHED")

    def end_parent(self, status: str = "FINISHED") -> None:
        if self.parent is not None:
            self.parent.end(status)

    def find_runs(self, filter_string: str = "") -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       max_results=10000)


class NullTracker:
    """Same methods as Tracker, doing nothing (tracking.enabled: false)."""

    enabled = False
    uri = ""
    experiment = ""
    experiment_id = ""
    parent = None

    def start_parent(self, run_name: str, config: ExperimentConfig | None = None) -> NullRun:
        return NullRun()

    def start_child(self, run_name: str, tags: dict[str, Any] | None = None) -> NullRun:
        return NullRun()

    @contextmanager
    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> Iterator[NullRun]:
        yield NullRun()

    def end_parent(self, status: str = "FINISHED") -> None:
        return None

    def find_runs(self, filter_string: str = "") -> list[Any]:
        return []


@contextmanager
def open_run(target: TrackingTarget | dict[str, Any] | None) -> Iterator[RunLogger | NullRun]:
    """In a Ray worker: log into the run the driver created (`mlflow.start_run(run_id=...)`),
    so both this RunLogger and MLflow's fluent calls (`mlflow.log_metric`) reach it.

    On exit the run is ended FINISHED (FAILED if the block raised), as `mlflow.start_run`
    does; the driver may still log to it afterwards (MLflow accepts logs on ended runs).
    """
    if target is None:
        yield NullRun()
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    if isinstance(target, dict):
        target = TrackingTarget.from_dict(target)
    mlflow.set_tracking_uri(target.tracking_uri)
    with mlflow.start_run(run_id=target.run_id, nested=mlflow.active_run() is not None):
        yield RunLogger(MlflowClient(tracking_uri=target.tracking_uri), target)
