"""Evaluation of every exported model (and the base models) with lm-eval, cached per model.

Models whose results are cached are not evaluated again; the rest go to
`orchestrator.evaluation.evaluate_many`, over a pool of evaluation actors. When some
models fail, the ones that finished are stored (cached) before the failure is raised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.cache import Stage, atomic_write_json, path_fingerprint
from orchestrator.config import ExperimentConfig
from orchestrator.logs import stage_key_line
from orchestrator.pipeline import stages as S
from orchestrator.tracking.target import RunLabel

# `benchmarks` only says how results are averaged for display: never a reason to re-evaluate.
_EVAL_RESOURCE_FIELDS = {"num_gpus", "num_cpus", "max_workers", "batch_size", "enabled",
                         "evaluate_base", "benchmarks"}
# Fields added later, left out of the key while unset so earlier results stay cached.
_EVAL_KEY_DEFAULTS = {"task_limit": {}, "seed": None}


def local_tasks_dir(cfg: ExperimentConfig, synthetic: S.StageOut | None) -> str | None:
    """The include path for lm-eval: the config's, or the synthetic corpus's own tasks."""
    if cfg.evaluate.include_path:
        return str(Path(cfg.evaluate.include_path).resolve())
    if synthetic is None:
        return None
    from orchestrator.evaluation.tasks import write_local_tasks

    out = synthetic.dir / "lm_eval_tasks"
    if not (out / "_written.json").is_file():
        path = write_local_tasks(synthetic.dir / "eval_mc.jsonl", synthetic.dir / "eval_gen.jsonl", out)
        (out / "_written.json").write_text(json.dumps({"include_path": str(path)}))
    return str(json.loads((out / "_written.json").read_text())["include_path"])


def evaluate_outcomes(cfg: ExperimentConfig, outcomes: list[Any], synthetic: S.StageOut | None,
                      track: Any) -> dict[str, dict[str, Any]]:
    """Evaluate base + trained models; returns {label: {task: {metric: value}}}.

    Labels are `<model>/<method>/s<seed>` and `<model>/base/-`.
    """
    wanted, revisions = _wanted(cfg, outcomes)
    from orchestrator.evaluation.ray_stage import EvaluationFailed

    try:
        results, dirs = evaluate_labelled(cfg, wanted, synthetic, revisions=revisions)
    except EvaluationFailed as failed:
        # The finished models still reach tracking; which models failed, and why, is written
        # beside the run (and is the error's message).
        done = {k: v for k, v in failed.results.items() if k in getattr(failed, "dirs", {})}
        track.log_eval(done, {k: failed.dirs[k] for k in done})
        atomic_write_json(S.stages_root(cfg).parent / "eval_failures.json",
                          {"failed": failed.errors, "finished": sorted(done)})
        raise
    track.log_eval(results, dirs)
    return results


def _wanted(cfg: ExperimentConfig, outcomes: list[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """({label: model dir}, {label: pinned commit of a hub-id base model}) of the outcomes."""
    wanted: dict[str, str] = {}
    revisions: dict[str, str] = {}
    for o in outcomes:
        if cfg.evaluate.evaluate_base and o.base_model:
            wanted[str(RunLabel(o.spec.name, "base"))] = o.base_model
            if getattr(o, "base_revision", None):
                revisions[str(RunLabel(o.spec.name, "base"))] = o.base_revision
        for (method, seed), model_dir in sorted(o.models.items()):
            wanted[str(RunLabel(o.spec.name, method, seed))] = model_dir
    return wanted, revisions


def evaluate_family_early(cfg: ExperimentConfig, outcome: Any, synthetic: S.StageOut | None) -> None:
    """Evaluate one family's models as soon as its chain is done, while the other families
    still train: the evaluation no longer waits for the slowest family, and its task
    start-ups overlap training instead of following it. The results land in the eval
    stages, where the run's final pass (`evaluate_outcomes`) finds them cached. A failure
    here is only reported: the final pass evaluates what is missing again and owns the
    error (which models failed, and why).

    The families share the evaluation workers (`evaluate.max_workers`), so three families
    finishing together start no more worker processes than one final pass would."""
    wanted, revisions = _wanted(cfg, [outcome])
    if not wanted:
        return
    families = max(1, min(cfg.ray.max_parallel_models, len(cfg.models)))
    try:
        evaluate_labelled(cfg, wanted, synthetic, revisions=revisions,
                          max_workers=max(1, cfg.evaluate.max_workers // families))
    except Exception as exc:  # noqa: BLE001 - the final pass retries and reports
        print(f"[lethe] evaluation of {outcome.spec.name} failed early ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); retried in the final pass",
              flush=True)


def evaluate_labelled(cfg: ExperimentConfig, wanted: dict[str, str], synthetic: S.StageOut | None,
                      in_process: bool = False, revisions: dict[str, str] | None = None,
                      max_workers: int | None = None,
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """{label: model dir} -> ({label: metrics}, {label: eval stage dir}); cached per model,
    the uncached ones evaluated in parallel Ray tasks, or here with `in_process` (a Tune
    trial: its placement group has no room for extra tasks)."""
    from orchestrator.evaluation import evaluate_many, evaluate_model

    include = local_tasks_dir(cfg, synthetic)
    ev = {k: v for k, v in cfg.evaluate.model_dump(mode="json").items()
          if k not in _EVAL_RESOURCE_FIELDS
          and not (k in _EVAL_KEY_DEFAULTS and v == _EVAL_KEY_DEFAULTS[k])}
    # A task folder from the config enters the key by content: editing a task YAML there
    # re-evaluates (the path alone would keep stale results).
    if cfg.evaluate.include_path and include is not None:
        tasks_key: Any = path_fingerprint(include)
    else:
        tasks_key = synthetic.key if synthetic is not None else include
    revisions = revisions or {}
    # Lethe's own task overrides (configs/eval/lm_eval_tasks) by content, for the configs
    # that run an overridden task only (the other keys are unchanged).
    from orchestrator.evaluation.task_data import overrides_fingerprint

    overrides = overrides_fingerprint(cfg.evaluate.tasks)
    # A pinned hub commit is part of what is evaluated (absent for local folders: their
    # keys are unchanged).
    stages = {label: Stage(S.stages_root(cfg), "eval", {
        "model": path, "evaluate": ev, "tasks": tasks_key,
        **({"task_overrides": overrides} if overrides else {}),
        **({"revision": revisions[label]} if label in revisions else {})})
        for label, path in wanted.items()}
    # open(): each model's eval stage is locked for this run, so a second run on the same
    # config waits for it and then finds it done instead of evaluating it again.
    todo = {label: wanted[label] for label, st in stages.items() if not st.open()}
    for label, st in stages.items():
        print(stage_key_line("eval", st.key, "running" if label in todo else "cached",
                             f"({label})"), flush=True)
    if todo:
        if in_process:
            # As configured, not as visible: the runner fails clearly when GPUs were asked
            # for and none is there.
            device = "cuda" if cfg.evaluate.num_gpus > 0 else "cpu"
            fresh = {label: evaluate_model(path, cfg.evaluate, include, device=device,
                                           revision=revisions.get(label))
                     for label, path in todo.items()}
        else:
            from orchestrator.evaluation.ray_stage import EvaluationFailed

            timings: dict[str, dict[str, float]] = {}
            try:
                cap = {"max_workers": max_workers} if max_workers else {}
                fresh = evaluate_many(todo, cfg.evaluate, include, timings,
                                      {k: v for k, v in revisions.items() if k in todo}, **cap)
                _add_to_timeline(timings)
            except EvaluationFailed as failed:
                _add_to_timeline(timings)
                _store(stages, failed.results)  # a rerun evaluates only the failed models
                finished = {label: st for label, st in stages.items() if st.done()}
                for label in failed.errors:  # let a concurrent or later run retry them
                    stages[label].release()
                failed.results = {label: dict(st.summary()["metrics"])
                                  for label, st in finished.items()}
                failed.dirs = {label: st.dir for label, st in finished.items()}
                raise
        _store(stages, fresh)
    results = {label: dict(st.summary()["metrics"]) for label, st in stages.items()}
    return results, {label: st.dir for label, st in stages.items()}


def _add_to_timeline(timings: dict[str, dict[str, float]]) -> None:
    """Each evaluated model's load (start-up) and lm-eval run (compute) on the run's timeline."""
    from orchestrator.pipeline import timeline

    tl = timeline.current()
    for label, t in timings.items():
        if {"start", "loaded", "evaluated"} <= t.keys():
            tl.add("evaluate", label.split("/", 1)[0], "startup", t["start"], t["loaded"])
            tl.add("evaluate", label.split("/", 1)[0], "compute", t["loaded"], t["evaluated"])


def _store(stages: dict[str, Stage], fresh: dict[str, dict[str, Any]]) -> None:
    for label, metrics in fresh.items():
        st = stages[label]
        st.prepare()
        atomic_write_json(st.dir / "eval_results.json", metrics)
        st.mark_done({"metrics": metrics})
