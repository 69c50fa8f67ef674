"""Ray wrapper around the plain evaluator: the models are split over a few Ray tasks, each
evaluating its share one after the other.

One task per model paid a worker start-up, lm-eval's task set-up and a model load per model;
with methods x seeds x families that start-up was most of the evaluation on a small machine.
A task evaluates several models in one process (imports and lm-eval's task manager are
reused), and as many tasks run at once as the cluster has room for.

Ray is imported only inside `evaluate_many`, so `orchestrator.evaluation.runner` stays
usable on a machine (or in a debugger) without Ray.
"""

from __future__ import annotations

import traceback

from orchestrator.config import EvaluateConfig
from orchestrator.errors import LetheError
from orchestrator.evaluation.runner import evaluate_model


def _evaluate_batch_body(model_dirs: dict[str, str], cfg_dict: dict,
                         include_path: str | None,
                         revisions: dict[str, str] | None = None) -> dict[str, dict]:
    """{name: model_dir} -> {name: {"metrics": ...} or {"error": "..."}}: one failing model
    does not lose the others' results."""
    # The config travels as a plain dict: pydantic models pickle fine, but a dict keeps the
    # task payload independent of the driver's class objects.
    cfg = EvaluateConfig.model_validate(cfg_dict)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    out: dict[str, dict] = {}
    for name, path in model_dirs.items():
        timing: dict[str, float] = {}
        try:
            out[name] = {"metrics": evaluate_model(path, cfg, include_path, device=device,
                                                   timing=timing,
                                                   revision=(revisions or {}).get(name)),
                         "timing": timing}
        except Exception as exc:  # noqa: BLE001 - reported per model by the caller
            out[name] = {"error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=5)}
    return out


def parallel_tasks(cfg: EvaluateConfig, n_models: int, resources: dict[str, float]) -> int:
    """How many evaluation tasks fit the cluster at once (at least 1, at most one per model)."""
    if cfg.num_gpus > 0:
        room = int(resources.get("GPU", 0.0) // cfg.num_gpus)
    else:
        # Leave one CPU slot for the driver's own Ray work; CPU slots may be logical.
        room = int(max(1.0, resources.get("CPU", 1.0) - 1.0) // cfg.num_cpus)
    return max(1, min(n_models, room))


def split_round_robin(names: list[str], k: int) -> list[list[str]]:
    return [chunk for chunk in (names[i::k] for i in range(k)) if chunk]


def evaluate_many(model_dirs: dict[str, str], cfg: EvaluateConfig,
                  include_path: str | None,
                  timings: dict[str, dict[str, float]] | None = None,
                  revisions: dict[str, str] | None = None,
                  max_tasks: int | None = None) -> dict[str, dict]:
    """{name: model_dir} -> {name: {task: {metric: value}}}, models spread over Ray tasks.

    Uses the running Ray instance (or starts a local one, as `ray.remote` does).
    A failing model raises here with its name, after the others finished. `timings`, when
    given, receives each evaluated model's wall-clock stamps (start, loaded, evaluated);
    `revisions` pins hub ids among the models to commits; `max_tasks` caps the tasks (a
    caller sharing the cluster's room with other evaluations).
    """
    import ray

    remote_fn = ray.remote(_evaluate_batch_body).options(
        num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus, name="lethe-evaluate"
    )
    cfg_dict = cfg.model_dump(mode="json")
    k = parallel_tasks(cfg, len(model_dirs), ray.cluster_resources())
    k = min(k, max_tasks) if max_tasks else k
    refs = [remote_fn.remote({n: model_dirs[n] for n in chunk}, cfg_dict, include_path,
                             {n: revisions[n] for n in chunk if n in (revisions or {})})
            for chunk in split_round_robin(sorted(model_dirs), k)]
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for ref in refs:
        for name, outcome in ray.get(ref).items():
            if "metrics" in outcome:
                results[name] = outcome["metrics"]
                if timings is not None:
                    timings[name] = outcome.get("timing", {})
            else:
                errors[name] = outcome["error"]
    if errors:
        raise EvaluationFailed(errors, results)
    return results


class EvaluationFailed(LetheError, RuntimeError):
    """Some models failed; `results` holds the ones that finished (callers can keep them).
    The message names every failed model with its error (the CLI prints it as one line)."""

    def __init__(self, errors: dict[str, str], results: dict[str, dict]) -> None:
        why = "; ".join(f"{name}: {errors[name].splitlines()[0] if errors[name] else '?'}"
                        for name in sorted(errors))
        super().__init__(f"evaluation failed for {len(errors)} of {len(errors) + len(results)} "
                         f"model(s), finished results kept (a rerun evaluates only the failed): "
                         f"{why}")
        self.errors, self.results = errors, results
