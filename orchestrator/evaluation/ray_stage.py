"""Ray wrapper around the plain evaluator: a pool of evaluation actors, models handed out as
actors free up.

Each actor is one evaluation worker (`evaluate.num_cpus` / `evaluate.num_gpus` each): its
imports and lm-eval's task set-up are paid once and reused for every model it evaluates.
The pool has at most `evaluate.max_workers` actors (the config's cap, never a snapshot of
the cluster): the ones with no room yet wait in Ray's queue (on a cluster, demand the
autoscaler sees) and take models when they start. A model goes to whichever actor is free.

A worker process that dies (killed, out of memory, a lost node) is restarted by Ray and
the model it held is evaluated once more there (`max_restarts=-1`, `max_task_retries=1`);
a second death on the same model reports that model failed, and the restarted worker
takes the next one.

Ray is imported only inside `evaluate_many`, so `orchestrator.evaluation.runner` stays
usable on a machine (or in a debugger) without Ray.
"""

from __future__ import annotations

import traceback
from collections import deque
from typing import Any

from orchestrator.config import EvaluateConfig
from orchestrator.errors import LetheError
from orchestrator.evaluation.runner import evaluate_model

# Ray's retries of a model whose worker process died: one more try, then it is failed.
MODEL_RETRIES = 1


class EvaluationWorker:
    """One pool actor (plain class: Ray wraps it). Evaluates one model per call; a model's
    own error (a missing folder, a failing task) is returned, not raised, so it never
    costs the actor."""

    def __init__(self, cfg_dict: dict, include_path: str | None) -> None:
        # The config travels as a plain dict: the task payload stays independent of the
        # driver's class objects.
        self.cfg = EvaluateConfig.model_validate(cfg_dict)
        self.include_path = include_path
        self.device = "cuda" if self.cfg.num_gpus > 0 else "cpu"

    def ready(self) -> bool:
        return True

    def evaluate(self, name: str, path: str, revision: str | None) -> dict[str, Any]:
        timing: dict[str, float] = {}
        try:
            metrics = evaluate_model(path, self.cfg, self.include_path, device=self.device,
                                     timing=timing, revision=revision)
            return {"name": name, "metrics": metrics, "timing": timing}
        except Exception as exc:  # noqa: BLE001 - reported per model by the caller
            return {"name": name, "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=5)}


def pool_size(cfg: EvaluateConfig, n_models: int, max_workers: int | None = None) -> int:
    """Actors in the pool: the config's cap (or a caller's smaller share), at most one per
    model, at least one."""
    cap = cfg.max_workers if max_workers is None else min(cfg.max_workers, max_workers)
    return max(1, min(cap, n_models))


def evaluate_many(model_dirs: dict[str, str], cfg: EvaluateConfig,
                  include_path: str | None,
                  timings: dict[str, dict[str, float]] | None = None,
                  revisions: dict[str, str] | None = None,
                  max_workers: int | None = None,
                  worker_cls: type = EvaluationWorker) -> dict[str, dict]:
    """{name: model_dir} -> {name: {task: {metric: value}}}, over a pool of actors.

    Uses the running Ray instance (or starts a local one, as `ray.remote` does).
    A failing model raises here with its name, after the others finished. `timings`, when
    given, receives each evaluated model's wall-clock stamps (start, loaded, evaluated);
    `revisions` pins hub ids among the models to commits; `max_workers` lowers the pool's
    cap (a caller sharing the cluster with other evaluations). `worker_cls` is the actor's
    class (tests pass a subclass).
    """
    import ray

    # A dead worker process is always restarted (its constructor only reads the config);
    # the model it held is retried once there (Ray's max_task_retries), then failed.
    remote = ray.remote(worker_cls).options(
        num_gpus=cfg.num_gpus or None, num_cpus=cfg.num_cpus,
        max_restarts=-1, max_task_retries=MODEL_RETRIES)
    cfg_dict = cfg.model_dump(mode="json")
    revisions = revisions or {}
    queue = deque(sorted(model_dirs))
    starting: dict[Any, Any] = {}  # ready() ref -> actor
    running: dict[Any, tuple[Any, str]] = {}  # evaluate() ref -> (actor, model)
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def start_actor() -> None:
        actor = remote.remote(cfg_dict, include_path)
        starting[actor.ready.remote()] = actor

    def hand_out(actor: Any) -> None:
        if queue:
            name = queue.popleft()
            running[actor.evaluate.remote(name, model_dirs[name], revisions.get(name))] = (actor, name)
        else:
            ray.kill(actor)  # idle with nothing left: its CPUs / GPU go back now

    size = pool_size(cfg, len(model_dirs), max_workers)
    for _ in range(size):
        start_actor()
    start_failures: list[str] = []
    try:
        while running or (queue and starting):
            ref = ray.wait([*starting, *running], num_returns=1)[0][0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    # Could not start even after Ray's restart: try another, a few times.
                    start_failures.append(str(exc).splitlines()[0][:200])
                    if len(start_failures) <= size:
                        start_actor()
                    continue
                hand_out(actor)
                continue
            actor, name = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                # Died on this model twice (Ray restarted the worker and retried the model
                # once): the model fails; the restarted worker takes the next one.
                errors[name] = (f"its evaluation worker died {MODEL_RETRIES + 1} times "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                hand_out(actor)
                continue
            if "metrics" in outcome:
                results[name] = outcome["metrics"]
                if timings is not None:
                    timings[name] = outcome.get("timing", {})
            else:
                errors[name] = outcome["error"]
            hand_out(actor)
    finally:
        for actor in [*starting.values(), *(a for a, _ in running.values())]:
            ray.kill(actor)
    for name in queue:  # never reached an actor (none could start)
        errors[name] = f"no evaluation worker could start ({'; '.join(start_failures[-1:])})"
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
