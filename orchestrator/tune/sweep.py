"""Ray Tune sweeps over the forgetting weight (lambda's maximum) and the threshold rho.

The shared, expensive stages (data, base, reference, scores) run once before the sweep and
are cached; each trial only re-partitions with its rho (cached per rho) and trains `forget`
with its lambda. Train V2 pattern: the Tune trainable is a driver function that builds the
TorchTrainer (inside `run_training`), with `TuneReportCallback` forwarding the workers'
intermediate metrics (`val_loss`) to Tune, so ASHA can stop weak trials early.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from orchestrator.cache import atomic_write_json
from orchestrator.config import ExperimentConfig, save_config
from orchestrator.pipeline import stages as S
from orchestrator.pipeline.run import init_ray, run_dir
from orchestrator.pipeline.tracking_glue import PipelineTracking
from orchestrator.pipeline.upstream import upstream
from orchestrator.tracking.target import RunLabel

# Off a terminal Tune runs silent (AirVerbosity 0: it still prints a trial's error) and the
# sweep prints one line per trial start and end (`trial_lines`): Tune's own output there is a
# status table every 30 s and a config box and a 35-line result box per trial, which the
# sweep's table at the end repeats.
TUNE_LOG_VERBOSITY = 0


def _shared_stages(cfg: ExperimentConfig, track: PipelineTracking) -> dict[str, Any]:
    """Everything trials share, computed (or found cached) once, as plain data."""
    up = upstream(cfg, cfg.models[0], "score", track=track)
    out = {"base": up.base, "tokens": up.tokens, "valid": up.valid, "scores": up.scores,
           "synthetic": up.source.synthetic}
    return {k: (None if v is None else {"key": v.key, "dir": str(v.dir), "cached": v.cached})
            for k, v in out.items()}


def _stage(d: dict[str, Any] | None) -> S.StageOut | None:
    return None if d is None else S.StageOut(d["key"], Path(d["dir"]), d["cached"])


def trial_config(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The experiment config with one trial's hyperparameters applied."""
    lam = cfg.train.lambda_.model_copy(update={"t_max": float(params["lambda_max"])})
    if "schedule" in params:
        lam = lam.model_copy(update={"schedule": params["schedule"]})
    train_upd: dict[str, Any] = {"lambda_": lam, "methods": ["forget"]}
    if "negative_term" in params:
        train_upd["negative_term"] = params["negative_term"]
    return cfg.model_copy(update={
        "partition": cfg.partition.model_copy(update={"rho": float(params["rho"])}),
        "train": cfg.train.model_copy(update=train_upd),
    })


def _trial(params: dict[str, Any], cfg_dict: dict[str, Any], shared: dict[str, Any],
           parent_run_id: str | None) -> None:
    """One trial: partition with its rho, train `forget` with its lambda, evaluate, report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.tune.resources import evaluate_in_trial

    cfg = trial_config(ExperimentConfig.model_validate(cfg_dict), params)
    spec = cfg.models[0]
    track = PipelineTracking.open(cfg, run_dir(cfg), check=False)
    track.attach_parent(parent_run_id)
    tokens, scores = _stage(shared["tokens"]), _stage(shared["scores"])
    base, valid = _stage(shared["base"]), _stage(shared["valid"])
    partition = S.partition_stage(cfg, tokens, scores)
    trial_id = tune.get_context().get_trial_id()
    tags = {"trial_id": str(trial_id), "sweep": cfg.name}
    target = track.target(spec, "forget", cfg.train.seed, extra_tags=tags)
    done = S.train_stage(cfg, spec, base, partition, valid, "forget", cfg.train.seed,
                         mlflow_target=target, callbacks=[TuneReportCallback()])
    metrics = S.stage_metrics(done)
    final = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))}
    report = S.partition_report(partition)
    final.update({"auroc": float(report.get("auroc") or float("nan")), "trial_finished": 1.0,
                  "lambda_max": float(params["lambda_max"]), "rho": float(params["rho"])})
    if cfg.evaluate.enabled:
        label = str(RunLabel(spec.name, "forget", cfg.train.seed))
        # on the GPU the trial reserved for it (tune/resources.py), or here on CPU
        results, dirs = evaluate_in_trial(cfg, {label: S.model_path(done)}, shared["synthetic"])
        track.log_eval(results, dirs, extra_tags=tags)
        final.update({f"eval/{task}/{m}": float(v) for task, ms in results[label].items()
                      for m, v in ms.items() if isinstance(v, (int, float))})
    track.finish_children()
    # A final report also covers a trial whose training was cached (no callback reports).
    tune.report(final)


def _search_space(cfg: ExperimentConfig) -> dict[str, Any]:
    from ray import tune

    t = cfg.tune
    space: dict[str, Any] = {"lambda_max": tune.loguniform(*t.lambda_max), "rho": tune.uniform(*t.rho)}
    if t.negative_terms:
        space["negative_term"] = tune.choice(t.negative_terms)
    if t.schedules:
        space["schedule"] = tune.choice(t.schedules)
    return space


def search_algorithm(cfg: ExperimentConfig, max_concurrent: int = 0) -> Any:
    """The sweep's search, seeded from the config's `seed`: a rerun of the same config
    proposes the same trials (random search: Tune's BasicVariantGenerator with a
    random_state; optuna: its TPE sampler's seed, behind a ConcurrencyLimiter)."""
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch  # needs `pip install optuna`

        searcher = OptunaSearch(seed=cfg.seed)
        return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.seed)


def proposed_trials(cfg: ExperimentConfig, count: int | None = None) -> list[dict[str, Any]]:
    """The hyperparameters the random search proposes, in order, without running a trial."""
    if cfg.tune.search_alg != "random":
        raise ValueError("proposed_trials samples the random search only (optuna's proposals "
                         "depend on the results of earlier trials)")
    gen = search_algorithm(cfg)
    gen.add_configurations({"proposals": {"run": _no_trial, "config": _search_space(cfg),
                                          "num_samples": count or cfg.tune.num_samples}})
    out = []
    while (trial := gen.next_trial()) is not None:
        out.append(dict(trial.config))
    return out


def _no_trial(config: dict[str, Any]) -> None:  # a trainable that `proposed_trials` never runs
    return None


def _max_concurrent(cfg: ExperimentConfig) -> int:
    """The config's cap (`tune.max_concurrent_trials`), never a snapshot of the cluster's
    resources at start: trials beyond what fits wait in Ray's queue."""
    return cfg.tune.max_concurrent_trials


def run_sweep(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; writes the best config as YAML and returns the table."""
    from functools import partial

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.logs import configure_console, interactive
    from orchestrator.tune.resources import require_validation, trial_resources

    require_validation(cfg)  # before any stage: a sweep whose metric never comes is refused
    configure_console()  # as `lethe run`: bars only on a terminal, quiet Ray workers otherwise
    root = run_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    track = PipelineTracking.open(cfg, root)
    init_ray(cfg)
    track.start(cfg, None, run_name=f"sweep-{cfg.name}")
    shared = _shared_stages(cfg, track)

    trainable = tune.with_resources(
        partial(_trial, cfg_dict=cfg.to_dict(), shared=shared,
                parent_run_id=track.parent.run_id if track.enabled else None),
        trial_resources(cfg),  # the driver's bundle (+ the evaluation's GPU bundle)
    )
    t = cfg.tune
    if t.metric.startswith("eval/"):
        # An evaluation metric (e.g. the validation questions') is in a trial's final report
        # only; the training's intermediate reports lack it, which Tune's strict check would
        # call an error. ASHA skips results without its metric.
        import os

        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor, max_t=10_000)
    # The concurrency cap lives in the (seeded) search algorithm: Tune ignores
    # max_concurrent_trials next to a BasicVariantGenerator it did not build itself.
    search_alg = search_algorithm(cfg, _max_concurrent(cfg))
    storage = root / "tune"
    name = f"sweep-{cfg.name}"
    if tune.Tuner.can_restore(str(storage / name)):
        print(f"[lethe] resuming the sweep in {storage / name}")
        tuner = tune.Tuner.restore(str(storage / name), trainable, resume_errored=True,
                                   param_space=_search_space(cfg))
    else:
        tuner = tune.Tuner(
            trainable, param_space=_search_space(cfg),
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                        scheduler=scheduler, search_alg=search_alg),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage),
                verbose=None if interactive() else TUNE_LOG_VERBOSITY,
                callbacks=None if interactive() else [trial_lines(t.metric)]),
        )
    grid = tuner.fit()
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": m.get("trial_id", r.path.rsplit("/", 1)[-1]),
                     "lambda_max": r.config.get("lambda_max"), "rho": r.config.get("rho"),
                     "negative_term": r.config.get("negative_term", cfg.train.negative_term),
                     "schedule": r.config.get("schedule", cfg.train.lambda_.schedule),
                     t.metric: m.get(t.metric), "iterations": m.get("training_iteration"),
                     # Tune's `done` is set on ASHA-stopped trials too; only a trial
                     # that ran its whole training reports `trial_finished`.
                     "finished": bool(m.get("trial_finished", 0.0)), "error": r.error is not None})
    best = grid.get_best_result(metric=t.metric, mode=t.mode, scope="all")
    best_cfg = trial_config(cfg, best.config)
    best_path = root / "best_config.yaml"
    save_config(best_cfg, best_path)
    table = format_trials(rows, t.metric)
    print(table)
    print(f"[lethe] best: lambda_max={best.config['lambda_max']:.4g} rho={best.config['rho']:.3f} "
          f"{t.metric}={best.metrics.get(t.metric)}  -> {best_path}")
    track.log_sweep(rows, t.metric, best_path, table)
    atomic_write_json(root / "sweep_trials.json", rows)
    return {"rows": rows, "best_config": str(best_path), "best": best.config}


def trial_lines(metric: str) -> Any:
    """A Tune callback printing one `[lethe] ... stage trial` line when a trial starts (its
    hyperparameters) and when it ends (done / stopped early / failed, its time and metric)."""
    from ray.tune import Callback

    from orchestrator.logs import stage_event

    def params(trial: Any) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in sorted(trial.config.items()))

    class TrialLines(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            stage_event("trial", str(trial.trial_id), "started", detail=params(trial))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "done" if (trial.last_result or {}).get("trial_finished") else "stopped")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "failed")

        @staticmethod
        def _end(trial: Any, event: str) -> None:
            last = trial.last_result or {}
            value = last.get(metric)
            shown = f"{metric}={value:.4f}" if isinstance(value, (int, float)) else f"{metric}=-"
            stage_event("trial", str(trial.trial_id), event, last.get("time_total_s"),
                        f"{shown} iterations={last.get('training_iteration', 0)} {params(trial)}")

    return TrialLines()


def format_trials(rows: list[dict[str, Any]], metric: str) -> str:
    head = f"{'trial':<24} {'lambda_max':>10} {'rho':>6} {'neg term':>12} {metric:>10} {'iters':>5}  status"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r[metric] is None, r[metric] or 0.0)):
        val = "-" if r[metric] is None else f"{r[metric]:.4f}"
        status = "error" if r["error"] else ("done" if r["finished"] else "stopped")
        lines.append(f"{str(r['trial'])[:24]:<24} {r['lambda_max']:>10.4g} {r['rho']:>6.3f} "
                     f"{r['negative_term']:>12} {val:>10} {r['iterations'] or 0:>5}  {status}")
    return "\n".join(lines)
