"""What the run report shows, gathered from the MLflow store and the run directory.

Everything comes from one pipeline invocation (the latest parent run by default): the eval
runs and the partition runs nested under it, their artifacts (partition statistics, token
inspector pages) and metric histories (training curves), plus the run directory's
`timeline.json` and `resolved_config.yaml`. A missing piece becomes a note in the report,
never an error: a report of a half-finished run is still worth sending.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.config import ExperimentConfig
from orchestrator.tracking.tracker import PARENT_TAG
from orchestrator.tracking.uri import resolve_tracking_uri

# Curves a training run logs (training/trainer.py) that the report plots, in panel order.
CURVE_KEYS = ("pos_loss", "neg_loss", "lambda", "val_loss")
INSPECT_MAX = 2  # inspector pages shown per model
TIMELINE_FILE = "timeline.json"
CONFIG_FILE = "resolved_config.yaml"


@dataclass
class PartitionView:
    model: str
    family: str
    stats: dict[str, Any]  # the partition report (orchestrator.method.partition_stats + extras)


@dataclass
class TrainingCurves:
    model: str
    label: str  # "<method>/s<seed>" or "reference"
    series: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)]


@dataclass
class InspectorPage:
    model: str
    name: str
    html: str


@dataclass
class ReportData:
    name: str
    experiment: str
    tracking_uri: str | None
    parent_run_id: str | None = None
    parent: dict[str, Any] = field(default_factory=dict)  # run name, start, status, tags
    eval_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    partition_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    partitions: list[PartitionView] = field(default_factory=list)
    curves: list[TrainingCurves] = field(default_factory=list)
    inspector: list[InspectorPage] = field(default_factory=list)
    timeline: list[dict[str, Any]] | None = None
    config_yaml: str = ""
    notes: list[str] = field(default_factory=list)
    # A `lethe tune` parent run: its trial table and the (lambda_max, rho) map of the metric
    sweep_table: str = ""
    sweep_png_uri: str | None = None


def run_root(cfg: ExperimentConfig) -> Path:
    """runs/<name>: the same folder the pipeline writes (pipeline.run.run_dir)."""
    return Path(cfg.run_dir).resolve() / cfg.name


# ----------------------------------------------------------------------------- run directory


def read_timeline(path: Path) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """Spans of `timeline.json` ({"spans": [...]} or a bare list) as dicts with stage, model,
    category, start, end (floats, end >= start); (None, []) when there is no file. Bad spans
    are skipped with a note naming their index and the problem."""
    if not path.is_file():
        return None, []
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, [f"{path}: unreadable timeline ({exc})"]
    spans = raw.get("spans") if isinstance(raw, dict) else raw
    if not isinstance(spans, list):
        return None, [f"{path}: expected a list of spans or {{\"spans\": [...]}}"]
    good, notes = [], []
    for i, span in enumerate(spans):
        try:
            start, end = float(span["start"]), float(span["end"])
            if end < start:
                raise ValueError(f"end {end} < start {start}")
            good.append({"stage": str(span["stage"]), "model": str(span.get("model", "-")),
                         "category": str(span.get("category", "stage")), "start": start, "end": end})
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"{path}: span {i} skipped ({type(exc).__name__}: {exc})")
    return good, notes


def read_config_text(cfg: ExperimentConfig, root: Path) -> str:
    """The resolved config the run saved, else this config as YAML."""
    saved = root / CONFIG_FILE
    if saved.is_file():
        return saved.read_text()
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- MLflow store


def _download_json(client: Any, run_id: str, path: str,
                   tmp: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object artifact at `path`, or (None, why not): absent, the store's error
    (unreachable, permissions), or not a JSON object. The reason goes into a report note."""
    from mlflow.exceptions import MlflowException

    try:
        listed = {f.path for f in client.list_artifacts(run_id, str(Path(path).parent))}
    except (MlflowException, OSError) as exc:
        return None, f"its artifacts could not be listed ({type(exc).__name__}: {exc})"
    if path not in listed:
        return None, f"has no {path}"
    try:
        local = client.download_artifacts(run_id, path, str(tmp))
        value = json.loads(Path(local).read_text())
    except (MlflowException, OSError) as exc:
        return None, f"{path} could not be downloaded ({type(exc).__name__}: {exc})"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{path} is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"{path} holds a JSON {type(value).__name__}, not an object"
    return value, None


def _curves(client: Any, run: Any) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for key in CURVE_KEYS:
        if key in run.data.metrics:
            hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            series[key] = [(int(m.step), float(m.value)) for m in hist]
    return series


def _model_key(cfg: ExperimentConfig, method_order: list[str]):
    models = [m.name for m in cfg.models]

    def key(item: tuple[str, str]) -> tuple[int, str, int, str]:
        model, label = item
        method = label.split("/")[0]
        return (models.index(model) if model in models else len(models), model,
                method_order.index(method) if method in method_order else len(method_order), label)

    return key


def collect_mlflow(data: ReportData, cfg: ExperimentConfig, tracking_uri: str,
                   parent_run_id: str | None = None) -> None:
    """Fill `data` from the store: eval and partition tables, partition statistics,
    training curves and inspector pages of the parent run's children."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.compare import (
        latest_parent_run_id,
        load_eval_runs,
        load_partition_runs,
    )

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(data.experiment)
    if exp is None:
        data.notes.append(f"no MLflow experiment '{data.experiment}' in {tracking_uri}")
        return
    parent = parent_run_id or latest_parent_run_id(tracking_uri, data.experiment)
    if parent is None:
        data.notes.append(f"no pipeline run in experiment '{data.experiment}'")
        return
    data.parent_run_id = parent
    info = client.get_run(parent)
    data.parent = {"run_name": info.info.run_name, "status": info.info.status,
                   "start_time": info.info.start_time, "end_time": info.info.end_time,
                   "tags": dict(info.data.tags), "metrics": dict(info.data.metrics)}
    _collect_sweep(data, client, parent)
    data.eval_runs = load_eval_runs(tracking_uri, data.experiment, parent)
    data.partition_runs = load_partition_runs(tracking_uri, data.experiment, parent)
    children = client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'",
                                  max_results=10000)
    methods = ["reference", "base", *cfg.train.methods]
    curves: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    partitions: dict[str, PartitionView] = {}
    pages: dict[str, list[InspectorPage]] = {}
    with tempfile.TemporaryDirectory(prefix="lethe-report-") as tmp_dir:
        tmp = Path(tmp_dir)
        for run in children:
            tags = run.data.tags
            model = tags.get("model") or tags.get("family") or "?"
            stage = tags.get("lethe.stage")
            if stage == "partition":
                stats, why = _download_json(client, run.info.run_id,
                                            "partition/partition_stats.json", tmp)
                if stats is None:
                    data.notes.append(f"{model}: partition run {run.info.run_id} {why}")
                    continue
                partitions[model] = PartitionView(model, tags.get("family", "?"), stats)
                pages[model] = _inspector_pages(client, run.info.run_id, model, tmp, data.notes)
            elif tags.get("method") or stage == "reference":
                label = "reference" if stage == "reference" else \
                    f"{tags['method']}/s{tags.get('seed', '-')}"
                series = _curves(client, run)
                if series:
                    curves[(model, label)] = series
    key = _model_key(cfg, methods)
    data.curves = [TrainingCurves(m, lab, s)
                   for (m, lab), s in sorted(curves.items(), key=lambda kv: key(kv[0]))]
    order = [m.name for m in cfg.models]
    for model in sorted(partitions, key=lambda m: (order.index(m) if m in order else len(order), m)):
        data.partitions.append(partitions[model])
        data.inspector.extend(pages.get(model, []))
    if not children:
        data.notes.append(f"pipeline run {parent} has no child runs yet")


def _collect_sweep(data: ReportData, client: Any, run_id: str) -> None:
    """The sweep's artifacts on its parent run (tracking_glue.log_sweep), when there are."""
    from orchestrator.tracking.report_plots import file_uri

    with tempfile.TemporaryDirectory(prefix="lethe-report-") as tmp:
        try:
            names = {f.path for f in client.list_artifacts(run_id, "sweep")}
        except Exception:  # noqa: BLE001 - not a sweep: no sweep folder
            return
        for name, apply in (("sweep/trials.txt", lambda p: setattr(data, "sweep_table", Path(p).read_text())),
                            ("sweep/metric_vs_lambda_rho.png",
                             lambda p: setattr(data, "sweep_png_uri", file_uri(p)))):
            if name in names:
                apply(client.download_artifacts(run_id, name, tmp))


def _inspector_pages(client: Any, run_id: str, model: str, tmp: Path,
                     notes: list[str]) -> list[InspectorPage]:
    """Up to INSPECT_MAX inspector pages of a partition run (none logged: none shown). A
    page the store cannot give is named in `notes` with the store's error."""
    from mlflow.exceptions import MlflowException

    try:
        files = [f.path for f in client.list_artifacts(run_id, "inspect") if f.path.endswith(".html")]
    except (MlflowException, OSError) as exc:
        notes.append(f"{model}: inspector pages of partition run {run_id} could not be listed "
                     f"({type(exc).__name__}: {exc})")
        return []
    out = []
    for path in sorted(files)[:INSPECT_MAX]:
        try:
            local = client.download_artifacts(run_id, path, str(tmp))
            html = Path(local).read_text()
        except (MlflowException, OSError, UnicodeDecodeError) as exc:
            notes.append(f"{model}: inspector page {path} of partition run {run_id} not shown "
                         f"({type(exc).__name__}: {exc})")
            continue
        out.append(InspectorPage(model, Path(path).stem, html))
    return out


def collect(cfg: ExperimentConfig, parent_run_id: str | None = None) -> ReportData:
    """Everything the report shows for `cfg`'s latest (or the given) pipeline run."""
    root = run_root(cfg)
    experiment = cfg.tracking.experiment or cfg.name
    uri = resolve_tracking_uri(cfg.tracking, root) if cfg.tracking.enabled else None
    data = ReportData(name=cfg.name, experiment=experiment, tracking_uri=uri)
    if uri is None:
        data.notes.append("tracking disabled (tracking.enabled: false): no comparison, "
                          "partition statistics or training curves")
    else:
        collect_mlflow(data, cfg, uri, parent_run_id)
    data.timeline, notes = read_timeline(root / TIMELINE_FILE)
    data.notes.extend(notes)
    data.config_yaml = read_config_text(cfg, root)
    return data
