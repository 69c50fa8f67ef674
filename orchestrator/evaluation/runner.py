"""Plain lm-eval runner (no Ray): evaluate one saved model on local or registry tasks.

`evaluate_model` loads the model once and calls `lm_eval.simple_evaluate` once per
(few-shot count, limit) setting (`plan_calls`: lm-eval takes one `num_fewshot` and one
`limit` per call), so a config can mix 0-shot tasks with `limit: 0.99` and 1-shot TydiQA
with 100 examples per language; the calls' results are merged per model. The returned dict is {task: {metric: value}} with lm-eval's `,<filter>` suffixes
removed; the full JSON-safe results are written to `eval_results.json` beside the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cache import atomic_write_json
from orchestrator.config import EvaluateConfig

log = logging.getLogger(__name__)

RESULTS_FILENAME = "eval_results.json"
# Bookkeeping fields lm-eval puts beside the scores (kept in the raw JSON, not as metrics).
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count"}
# Offline on the embedded instance: a missing local file must fail, never fall back to a
# download. A cluster job's evaluation reads its task datasets from the hub (embedded.py).
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# torch.distributed launcher variables. accelerate (inside lm-eval's `hf` model) takes a set
# LOCAL_RANK for a multi-process launch and joins a process group on MASTER_PORT; a Lethe
# evaluation is one process, and such variables reach it only by leaking (a Ray worker
# started from a shell that had run a local training, a node image that exports them).
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "NODE_RANK")


@contextlib.contextmanager
def single_process_env() -> Iterator[list[str]]:
    """Hide the launcher variables while evaluating; yields the names hidden (restored after)."""
    hidden = {key: os.environ.pop(key) for key in _LAUNCHER_ENV if key in os.environ}
    if hidden:
        log.warning("evaluation is single-process: ignoring inherited %s", ", ".join(sorted(hidden)))
    try:
        yield sorted(hidden)
    finally:
        os.environ.update(hidden)


def group_tasks_by_fewshot(tasks: list[str], num_fewshot: dict[str, int]) -> dict[int | None, list[str]]:
    """{shots: [tasks]}; None = the task's own default (0 when it defines none)."""
    groups: dict[int | None, list[str]] = defaultdict(list)
    for task in tasks:
        groups[num_fewshot.get(task)].append(task)
    return dict(groups)


@dataclass(frozen=True)
class EvalCall:
    """One `lm_eval.simple_evaluate` call: the tasks that share a shot count and a limit."""

    tasks: tuple[str, ...]
    num_fewshot: int | None  # None = each task's own default
    limit: int | float | None

    def describe(self) -> str:
        shots = "task default shots" if self.num_fewshot is None else f"{self.num_fewshot}-shot"
        limit = "all examples" if self.limit is None else (
            f"limit {self.limit:g} (fraction)" if isinstance(self.limit, float) else
            f"limit {self.limit} per task")
        return f"{shots}, {limit}: {', '.join(self.tasks)}"


def plan_calls(cfg: EvaluateConfig) -> list[EvalCall]:
    """cfg.tasks grouped by (shots, limit) in first-appearance order: one lm-eval call each."""
    groups: dict[tuple[int | None, int | float | None], list[str]] = {}
    for task in cfg.tasks:
        key = (cfg.num_fewshot.get(task), cfg.task_limit.get(task, cfg.limit))
        groups.setdefault(key, []).append(task)
    return [EvalCall(tuple(tasks), shots, limit) for (shots, limit), tasks in groups.items()]


def describe_plan(cfg: EvaluateConfig) -> list[str]:
    """Human-readable lines: every task with its shots and limit, the calls, the headline."""
    calls = plan_calls(cfg)
    lines = [f"{len(cfg.tasks)} lm-eval tasks in {len(calls)} call(s)"
             + (f", seed {cfg.seed}" if cfg.seed is not None else "") + ":"]
    lines += [f"  call {i + 1}: {call.describe()}" for i, call in enumerate(calls)]
    if cfg.benchmarks:
        lines.append(f"headline: average over {len(cfg.benchmarks)} benchmarks:")
        for name, spec in cfg.benchmarks.items():
            shots = sorted({str(cfg.num_fewshot.get(t, "default")) for t in spec.tasks})
            over = f"mean over {len(spec.tasks)} tasks" if len(spec.tasks) > 1 else spec.tasks[0]
            lines.append(f"  {name}: {spec.metric} ({over}), {'/'.join(shots)}-shot")
    return lines


def normalise_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"acc,none": .., "exact_match,final-answer": ..} -> {"acc": .., "exact_match": ..}.

    A metric reported under several filters keeps each one as `<metric>_<filter>` (and the
    bare name is not used), so nothing is silently overwritten. Non-numeric entries (the
    alias, "N/A" stderrs) are dropped.
    """
    by_metric: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in task_results.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        metric, _, filt = key.partition(",")
        by_metric[metric][filt or "none"] = float(value)
    out: dict[str, float] = {}
    for metric, per_filter in by_metric.items():
        if len(per_filter) == 1:
            out[metric] = next(iter(per_filter.values()))
        else:
            for filt, value in per_filter.items():
                out[f"{metric}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', filt)}"] = value
    return out


def json_safe(obj: Any) -> Any:
    """Recursively keep what JSON can hold; callables and other objects become their repr."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    return repr(obj)


def build_task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager that sees the local tasks; the built-in registry is indexed only when
    a requested task is not local (indexing thousands of YAMLs costs seconds). Lethe's task
    overrides (configs/eval/lm_eval_tasks: registry tasks whose datasets need a loading
    script, read from a script-free copy) come before `include_path`, which can replace
    them, and after the registry, which they replace (evaluation/task_data.py)."""
    from lm_eval.tasks import TaskManager

    from orchestrator.evaluation.task_data import include_paths

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_paths(tasks, include_path))


def load_hf_lm(model_dir: str, cfg: EvaluateConfig, device: str, revision: str | None = None):
    """lm-eval's `hf` model built from a local folder (or a hub id at `revision`), loaded
    once for all task groups."""
    from lm_eval.api.registry import get_model

    from orchestrator.models import resolve_dtype  # one rule for `auto`, as for training

    model_args = {
        "pretrained": model_dir,
        "dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
        "trust_remote_code": False,
    }
    if revision is not None:
        model_args["revision"] = revision
    return get_model("hf").create_from_arg_obj(
        model_args, {"batch_size": cfg.batch_size, "device": device}
    ), model_args


def run_lm_eval(lm: Any, cfg: EvaluateConfig, include_path: str | None) -> dict[str, Any]:
    """Evaluate an lm-eval LM object on cfg.tasks; returns the merged raw results
    ({"results", "n-shot", "versions", "n-samples", "higher_is_better"})."""
    import lm_eval

    from orchestrator.embedded import in_embedded_instance

    if in_embedded_instance():
        for key, value in _OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
    task_manager = build_task_manager(cfg.tasks, include_path)
    merged: dict[str, Any] = defaultdict(dict)
    seeds = {} if cfg.seed is None else {  # as lm-eval's `--seed N` sets all four
        "random_seed": cfg.seed, "numpy_random_seed": cfg.seed,
        "torch_random_seed": cfg.seed, "fewshot_random_seed": cfg.seed}
    merged["calls"] = []
    for call in plan_calls(cfg):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(call.tasks),
            num_fewshot=call.num_fewshot,
            batch_size=cfg.batch_size,
            limit=call.limit,
            task_manager=task_manager,
            log_samples=False,
            bootstrap_iters=0,  # stderr bootstraps cost minutes on CPU and are not reported
            **seeds,
        )
        merged["calls"].append({"tasks": list(call.tasks), "num_fewshot": call.num_fewshot,
                                "limit": call.limit})
        if out is None:  # non-zero rank in a distributed launch: nothing to merge
            continue
        for section in ("results", "n-shot", "versions", "n-samples", "higher_is_better"):
            clash = set(merged[section]) & set(out.get(section) or {})
            if section == "results" and clash:  # a group task may repeat a listed subtask
                raise ValueError(f"evaluate.tasks: {sorted(clash)} evaluated by two lm-eval "
                                 "calls with different shots or limits; list each task once")
            merged[section].update(out.get(section) or {})
    return dict(merged)


def check_eval_device(cfg: EvaluateConfig, device: str) -> None:
    """No silent CPU evaluation when the config asks for GPUs (and no CUDA device that
    lm-eval would fail on later with a less clear message)."""
    import torch

    wants_cuda = str(device).startswith("cuda") or cfg.num_gpus > 0
    if wants_cuda and not (str(device).startswith("cuda") and torch.cuda.is_available()):
        raise RuntimeError(
            f"evaluate.num_gpus is {cfg.num_gpus}, but no CUDA device is visible to this process "
            f"(device {device!r}, torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "set evaluate.num_gpus=0 to evaluate on CPU")


def evaluate_model(model_dir: str, cfg: EvaluateConfig, include_path: str | None,
                   device: str = "cpu", *, results_path: str | None = None,
                   timing: dict[str, float] | None = None,
                   revision: str | None = None) -> dict:
    """Run lm-eval on a saved HF model folder; return {task: {metric: value}}.

    The JSON results go to `results_path`, default `<model_dir>/eval_results.json` when
    model_dir is a local folder (a hub id has no folder to write beside). `timing`, when
    given, receives wall-clock stamps: start, loaded (model ready), evaluated. `revision`
    pins a hub id to a commit.
    """
    import time

    stamps = timing if timing is not None else {}
    stamps["start"] = time.time()
    include_path = include_path or cfg.include_path
    check_eval_device(cfg, device)
    with single_process_env():
        lm, model_args = load_hf_lm(model_dir, cfg, device, revision)
        stamps["loaded"] = time.time()
        raw = run_lm_eval(lm, cfg, include_path)
        stamps["evaluated"] = time.time()
    metrics = {task: normalise_metrics(res) for task, res in raw.get("results", {}).items()}
    if cfg.benchmarks:  # a wrong metric name would only show as a blank headline cell
        from orchestrator.evaluation.benchmarks import missing_benchmark_metrics

        for line in missing_benchmark_metrics(metrics, cfg.benchmarks):
            log.warning("%s: %s; that benchmark and the average stay blank", model_dir, line)

    target = Path(results_path) if results_path else (
        Path(model_dir) / RESULTS_FILENAME if Path(model_dir).is_dir() else None)
    if target is not None:
        payload = {
            "model_dir": str(model_dir),
            "model_args": model_args,
            "device": device,
            "tasks": list(cfg.tasks),
            "num_fewshot": dict(cfg.num_fewshot),
            "limit": cfg.limit,
            "task_limit": dict(cfg.task_limit),
            "metrics": metrics,
            "lm_eval": raw,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a reader never sees half a file
        atomic_write_json(target, json_safe(payload), sort_keys=True)
        log.info("wrote %s", target)
    return metrics
