"""`lethe plan CONFIG`: what a run would do, computed from the config and the run directory
only: no model is loaded, no data is tokenized, nothing is written.

It prints
- every stage with its content hash and whether it is already done (cached) or would run;
  the keys come from the pipeline's own stage functions (orchestrator/pipeline/stages.py)
  walked with their `_open` replaced by a read-only look-up, so they cannot drift from what
  `lethe run` computes;
- the samples each training sees and the optimizer steps it takes (exact once the data
  stage is done, else estimated from the config and marked '~' / '<=');
- the resources each stage asks Ray for, against `ray.cluster_resources()` of the configured
  cluster (or of a local instance started for the plan), per bundle against the largest
  node and in total against the cluster;
and refuses (exit status 1) a config whose stages cannot be placed, naming the field to
change, e.g. "train.num_workers=8 x train.gpus_per_worker=1.0 = 8 GPU; the cluster has 0".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cache import Stage
from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.pipeline import source_stages as D
from orchestrator.pipeline import stages as S

Resources = dict[str, float]


@dataclass
class StageRow:
    model: str  # "-" for stages shared by every model
    name: str
    key: str
    cached: bool
    label: str = ""


@dataclass
class Ask:
    """One stage's request to Ray: `count` bundles of `each`, `fields` naming the config
    fields behind each resource (and `count_field` behind the count)."""

    stage: str
    each: Resources
    count: int
    fields: dict[str, str]
    count_field: str | None = None


@dataclass
class Plan:
    cfg: ExperimentConfig
    stages: list[StageRow] = field(default_factory=list)
    data: list[dict[str, Any]] = field(default_factory=list)  # per model: samples / steps
    asks: list[Ask] = field(default_factory=list)
    cluster: Resources = field(default_factory=dict)
    nodes: list[Resources] = field(default_factory=list)
    cluster_note: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def placeable(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------ stages


@contextmanager
def _read_only_stages() -> Iterator[list[tuple[str, Stage, bool]]]:
    """Stage functions that report every stage as done (so none computes, locks or
    writes) and record the real state of each."""
    seen: list[tuple[str, Stage, bool]] = []
    real = S._open

    def look(cfg: ExperimentConfig, name: str, inputs: dict[str, Any]) -> tuple[Stage, bool]:
        st = Stage(S.stages_root(cfg), name, inputs)
        seen.append((name, st, st.done()))
        return st, True

    S._open = look
    try:
        yield seen
    finally:
        S._open = real


def _seeds(cfg: ExperimentConfig) -> list[int]:
    return list(cfg.seeds) if cfg.seeds else [cfg.train.seed]


def walk_stages(cfg: ExperimentConfig, plan: Plan) -> dict[str, dict[str, Stage]]:
    """Fill plan.stages in pipeline order; returns model -> {stage label: Stage}."""
    out: dict[str, dict[str, Stage]] = {}
    with _read_only_stages() as seen:
        def take(model: str, labels: list[str] | None = None) -> None:
            for i, (name, st, done) in enumerate(seen):
                label = labels[i] if labels else name
                plan.stages.append(StageRow(model, name, st.key, done, label))
                out.setdefault(model, {})[label] = st
            seen.clear()

        synthetic = D.synthetic_stage(cfg) if cfg.data.source == "synthetic" else None
        rows, valid_rows, ident = D.source_rows(cfg, synthetic)
        take("-")
        for spec in cfg.models:
            try:
                base = S.base_stage(cfg, spec, rows, ident)
            except ConfigError as exc:
                plan.problems.append(str(exc))
                seen.clear()
                continue
            tokens = S.tokens_stage(cfg, base, rows, ident, split="train")
            labels = ["base", "tokens"]
            valid = None
            if valid_rows:
                valid = S.tokens_stage(cfg, base, valid_rows, ident, split="clean_valid")
                labels.append("tokens (valid)")
            reference = S.reference_stage(cfg, spec, base, tokens, valid)
            scores = S.score_stage(cfg, base, reference, tokens)
            partition = S.partition_stage(cfg, tokens, scores)
            labels += ["reference", "scores", "partition"]
            jobs = [(m, s) for m in cfg.train.methods for s in _seeds(cfg)]
            requests = [S.TrainRequest(tokens if m == "sft" else partition, m, s) for m, s in jobs]
            S.train_stages(cfg, spec, base, valid, requests)
            labels += [f"train {m} seed {s}" for m, s in jobs]
            take(spec.name, labels)
    return out


# ------------------------------------------------------------------------ samples, steps


def _parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else None


def _estimated_rows(cfg: ExperimentConfig, stages: dict[str, Stage]) -> tuple[int | None, str]:
    """(training rows, how sure): exact from a finished tokens stage, else from the config."""
    tokens = stages.get("tokens")
    if tokens is not None and tokens.done():
        n = _parquet_rows(tokens.dir / "tokens.parquet")
        if n is not None:
            return n, "="
    d = cfg.data
    if d.source == "synthetic":
        n = d.synthetic.num_train
        return (min(n, d.limit) if d.limit else n), "~"  # rejected rows are not known yet
    sample = next((st for lbl, st in stages.items() if lbl == "sample"), None)
    if sample is not None and sample.done():
        return int(json.loads((sample.dir / "report.json").read_text())["train"]), "<="
    local = Path(str(d.path))
    n = _parquet_rows(local) if local.suffix == ".parquet" else None
    if n is not None:
        n -= cfg.train.validation_size
        return (min(n, d.limit) if d.limit else n), "<="
    if d.limit:
        return d.limit, "<="
    return None, "?"


def _steps(n: int, workers: int, micro: int, gas: int, epochs: float,
           max_steps: int | None) -> int | str:
    from orchestrator.training.stage import planned_updates

    try:
        return planned_updates(n, workers, micro, gas, epochs, max_steps)
    except ValueError as exc:
        return f"impossible ({exc})"


def data_summary(cfg: ExperimentConfig, spec_name: str, stages: dict[str, Stage],
                 shared: dict[str, Stage]) -> dict[str, Any]:
    n, sure = _estimated_rows(cfg, {**shared, **stages})
    t, ref = cfg.train, cfg.reference
    row: dict[str, Any] = {"model": spec_name, "train_rows": n, "sure": sure}
    if n is None:
        return row
    n_ref = ref.subset_size if ref.subset_size else max(1, int(round(ref.subset_fraction * n)))
    if n_ref > n:
        row["ref_problem"] = (f"reference.subset_size={n_ref} exceeds the training pool "
                              f"({sure}{n} rows)")
    n_ref = min(n_ref, n)
    row["reference_rows"] = n_ref
    row["reference_steps"] = _steps(n_ref, t.num_workers, t.micro_batch_size, t.grad_accum_steps,
                                    ref.epochs if ref.epochs is not None else t.epochs, t.max_steps)
    row["train_steps"] = _steps(n, t.num_workers, t.micro_batch_size, t.grad_accum_steps,
                                t.epochs, t.max_steps)
    row["sequences_per_step"] = t.num_workers * t.micro_batch_size * t.grad_accum_steps
    row["trainings"] = len(cfg.train.methods) * len(_seeds(cfg))
    return row


# ---------------------------------------------------------------------------- resources


def stage_asks(cfg: ExperimentConfig) -> list[Ask]:
    """What each stage asks Ray for, as the stages themselves request it."""
    t, sc, ev = cfg.train, cfg.scoring, cfg.evaluate
    worker: Resources = {"CPU": t.cpus_per_worker}
    fields = {"CPU": "train.cpus_per_worker"}
    if t.use_gpu:  # orchestrator/training/stage.py: gpus_per_worker, 1 when left at 0
        worker["GPU"] = t.gpus_per_worker or 1.0
        fields["GPU"] = "train.gpus_per_worker" if t.gpus_per_worker else "train.use_gpu"
    asks = [Ask("reference + train (Ray Train workers)", worker, t.num_workers, fields,
                "train.num_workers")]
    actor: Resources = {"CPU": sc.num_cpus_per_actor}
    afields = {"CPU": "scoring.num_cpus_per_actor"}
    if sc.num_gpus_per_actor:
        actor["GPU"] = sc.num_gpus_per_actor
        afields["GPU"] = "scoring.num_gpus_per_actor"
    asks.append(Ask("score (scoring actors)", actor, sc.num_actors, afields,
                    "scoring.num_actors"))
    if ev.enabled:
        task: Resources = {"CPU": ev.num_cpus}
        efields = {"CPU": "evaluate.num_cpus"}
        if ev.num_gpus:
            task["GPU"] = ev.num_gpus
            efields["GPU"] = "evaluate.num_gpus"
        asks.append(Ask("evaluate (a pool of evaluation actors)", task, 1, efields))
    return asks


def _fmt(r: Resources) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(r.items())) or "-"


def placement_problems(asks: list[Ask], cluster: Resources, nodes: list[Resources]) -> list[str]:
    """Why an ask cannot be placed: more in total than the cluster has, or a bundle larger
    than every node. Each message names the config field(s) to change."""
    problems = []
    for ask in asks:
        short = set()
        for r, v in ask.each.items():
            need, have = v * ask.count, cluster.get(r, 0.0)
            if need > have + 1e-9:
                short.add(r)
                count = f"{ask.count_field}={ask.count} x " if ask.count_field else ""
                problems.append(f"{ask.stage}: {count}{ask.fields[r]}={v:g} = {need:g} {r}; "
                                f"the cluster has {have:g} {r}")
        if not nodes or any(all(n.get(r, 0.0) >= v for r, v in ask.each.items()) for n in nodes):
            continue
        # Each bundle (one worker / actor / task) must fit on one node.
        for r, v in ask.each.items():
            largest = max(n.get(r, 0.0) for n in nodes)
            if largest < v and r not in short:
                problems.append(f"{ask.stage}: {ask.fields[r]}={v:g} {r} per bundle, but no "
                                f"node has that much (largest node: {largest:g} {r})")
        if all(max(n.get(r, 0.0) for n in nodes) >= v for r, v in ask.each.items()):
            problems.append(f"{ask.stage}: no single node has {_fmt(ask.each)} at once "
                            f"({', '.join(ask.fields.values())})")
    return problems


def cluster_view(cfg: ExperimentConfig, address: str | None = None) -> tuple[Resources, list[Resources], str]:
    """(total resources, per-node resources, where they came from). Uses the Ray connection
    of this process when there is one; else connects to `address` / ray.address / the job's
    RAY_ADDRESS, or starts a local instance (as `lethe run` would) and stops it again."""
    import ray

    started = False
    if ray.is_initialized():
        note = "the Ray instance this process is connected to"
    else:
        target = address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
        if target == "local":
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)
            cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else "all"
            note = (f"a local Ray instance started for this plan ({cpus} CPUs, as `lethe run` "
                    "would start it); give --address to check a cluster")
        else:
            ray.init(address=target, logging_level="ERROR", log_to_driver=False)
            note = f"the Ray cluster at {target}"
        started = True
    try:
        total = {k: float(v) for k, v in ray.cluster_resources().items()}
        nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()}
                 for n in ray.nodes() if n.get("Alive")]
    finally:
        if started:
            ray.shutdown()
    return total, nodes, note


def make_plan(cfg: ExperimentConfig, *, address: str | None = None,
              resources: tuple[Resources, list[Resources]] | None = None) -> Plan:
    """The plan; `resources` = (totals, nodes) replaces asking Ray (tests, offline use)."""
    from orchestrator.pipeline.preflight import check_models

    plan = Plan(cfg)
    try:
        check_models(cfg)
    except ConfigError as exc:
        plan.problems.append(str(exc))
    by_model = walk_stages(cfg, plan)
    shared = by_model.get("-", {})
    for spec in cfg.models:
        if spec.name in by_model:
            row = data_summary(cfg, spec.name, by_model[spec.name], shared)
            plan.data.append(row)
            if "ref_problem" in row:
                plan.problems.append(row["ref_problem"])
    if not cfg.train.validation_size and cfg.data.source != "synthetic":
        plan.notes.append("train.validation_size=0: no validation split, so trainings report "
                          "no val_loss (the metric `lethe tune` optimises)")
    plan.asks = stage_asks(cfg)
    if resources is not None:
        plan.cluster, plan.nodes = resources
        plan.cluster_note = "resources given by the caller"
    else:
        try:
            plan.cluster, plan.nodes, plan.cluster_note = cluster_view(cfg, address)
        except Exception as exc:  # Ray's start-up / connection errors have many types
            plan.cluster_note = "unreachable"
            plan.problems.append(f"could not reach Ray ({type(exc).__name__}: {exc}); the "
                                 "resources were not checked")
            return plan
    plan.problems += placement_problems(plan.asks, plan.cluster, plan.nodes)
    return plan


# ------------------------------------------------------------------------------ output


def format_plan(plan: Plan) -> str:
    cfg = plan.cfg
    lines = [f"plan for '{cfg.name}' (run directory {S.stages_root(cfg).parent}); nothing was "
             "computed", "", "stages (content hash; 'cached' = done, reused by `lethe run`):"]
    model = None
    for row in plan.stages:
        if row.model != model:
            model = row.model
            lines.append(f"  {'shared' if model == '-' else model}")
        lines.append(f"    {row.label:<22} {row.key}  {'cached' if row.cached else 'to run'}")
    n_run = sum(not r.cached for r in plan.stages)
    lines.append(f"  {len(plan.stages)} stages, {n_run} to run (+ evaluation of each trained "
                 "model, keyed by its export)")
    lines += ["", "samples and optimizer steps ('=' exact, '~' estimate, '<=' upper bound):"]
    for row in plan.data:
        n = row["train_rows"]
        if n is None:
            lines.append(f"  {row['model']}: training rows unknown until the data stage runs")
            continue
        lines.append(
            f"  {row['model']}: {row['sure']}{n} training rows; reference on "
            f"{row['reference_rows']} rows -> {row['reference_steps']} steps; each of "
            f"{row['trainings']} trainings -> {row['train_steps']} steps of "
            f"{row['sequences_per_step']} sequences")
    lines += ["", f"cluster: {plan.cluster_note}",
              f"  total: {_fmt(_plain(plan.cluster))}; {len(plan.nodes)} node(s), largest: "
              f"{_fmt(_plain(_largest(plan.nodes)))}",
              "", "resources asked (each bundle x count = total):"]
    for ask in plan.asks:
        total = {r: v * ask.count for r, v in ask.each.items()}
        lines.append(f"  {ask.stage:<38} {_fmt(ask.each):<16} x {ask.count:<3} = {_fmt(total)}")
    lines.append("")
    lines += [f"note: {n}" for n in plan.notes]
    if plan.problems:
        lines.append("REFUSED: this config cannot run as written:")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append("OK: every stage can be placed on this cluster")
    return "\n".join(lines)


def _plain(r: Resources) -> Resources:
    """CPU / GPU / memory (GiB) only: Ray's per-node marker resources are noise here."""
    out = {k: v for k, v in r.items() if k in ("CPU", "GPU")}
    if "memory" in r:
        out["memory GiB"] = round(r["memory"] / 2**30, 1)
    return out


def _largest(nodes: list[Resources]) -> Resources:
    return max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})


def run_plan(cfg: ExperimentConfig, address: str | None = None) -> int:
    """Print the plan; 0 when it can be placed, 1 when refused."""
    plan = make_plan(cfg, address=address)
    print(format_plan(plan))
    return 0 if plan.placeable else 1

