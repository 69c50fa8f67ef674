"""What a `lethe tune` trial needs before it starts: validation data for the metric it is
ranked by, and a reservation for the evaluation it runs at its end.

- **Validation data.** The sweep ranks trials by `tune.metric` (default `val_loss`), which a
  training reports only when it has a validation split: the synthetic corpus's clean
  held-out rows, or `train.validation_size` rows held out of any other source. A config
  without one (the paper configs set `train.validation_size: 0`) is refused at once, naming
  the field, instead of running every trial to a metric that never comes. No default split
  is invented: how many rows to hold out of a 50k-row pool is the experiment's choice (and
  enters every data key).
- **The evaluation's GPU.** A trial's driver function reserves `tune.cpus_per_trial` /
  `tune.gpus_per_trial`; its training's Ray Train workers reserve their own. A trial that
  evaluates (`evaluate.enabled`) on a GPU (`evaluate.num_gpus` > 0) also needs that GPU, so
  its resources are a Tune `PlacementGroupFactory` of two bundles: the driver's (bundle 0)
  and the evaluation's (bundle 1: `evaluate.num_cpus` CPUs, `evaluate.num_gpus` GPUs). The
  evaluation then runs as a Ray task placed in bundle 1 and picks its device from the GPUs
  Ray assigned to it there: "cuda" when it holds one, never "cuda" in a process that
  reserved none. An evaluation on CPU runs in the driver, as before (nothing to reserve
  beyond the driver's own CPU share).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.config import ConfigError, ExperimentConfig

T = TypeVar("T")
EVAL_BUNDLE = 1  # index of the evaluation's bundle in a trial's placement group


def has_validation(cfg: ExperimentConfig) -> bool:
    """Whether trainings of this config report a validation loss."""
    return cfg.data.source == "synthetic" or cfg.train.validation_size > 0


def require_validation(cfg: ExperimentConfig) -> None:
    """ConfigError, naming train.validation_size, when tune.metric is a validation metric
    and the config holds out no validation data."""
    metric = cfg.tune.metric
    if not metric.startswith("val_") or has_validation(cfg):
        return
    raise ConfigError(
        f"lethe tune: tune.metric={metric} needs validation data, but train.validation_size=0 "
        f"and data.source={cfg.data.source} has no validation split of its own, so no trial "
        "would ever report it. Set train.validation_size (rows held out of the training "
        "data, e.g. train.validation_size=500), or rank trials by an evaluation metric "
        "(tune.metric=eval/<task>/<metric>, tune.mode=max)")


def trial_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """The trial's bundles: its driver's, plus the evaluation's when it evaluates on GPUs."""
    t, ev = cfg.tune, cfg.evaluate
    driver = {"CPU": t.cpus_per_trial, **({"GPU": t.gpus_per_trial} if t.gpus_per_trial else {})}
    if not evaluates_on_gpu(cfg):
        return [driver]
    return [driver, {"CPU": ev.num_cpus, "GPU": ev.num_gpus}]


def evaluates_on_gpu(cfg: ExperimentConfig) -> bool:
    return cfg.evaluate.enabled and cfg.evaluate.num_gpus > 0


def trial_resources(cfg: ExperimentConfig) -> Any:
    """What `tune.with_resources` gets: a PlacementGroupFactory of `trial_bundles` (PACK: the
    evaluation's GPU beside the driver when one node has room, else anywhere)."""
    from ray import tune

    return tune.PlacementGroupFactory(trial_bundles(cfg), strategy="PACK")


def assigned_device() -> str:
    """The device of the GPUs Ray assigned to this task or actor: "cuda" when it holds
    one (CUDA_VISIBLE_DEVICES is then set to it), else "cpu"."""
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def run_in_eval_bundle(fn: Callable[..., T], *args: Any, num_cpus: float, num_gpus: float) -> T:
    """`fn(*args)` as a Ray task in bundle EVAL_BUNDLE of the calling trial's placement
    group, holding `num_cpus` / `num_gpus` of it; returns its result."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None or len(group.bundle_specs) <= EVAL_BUNDLE:
        raise RuntimeError("run_in_eval_bundle: the caller holds no placement group with an "
                           "evaluation bundle (trial_resources reserves one)")
    task = ray.remote(fn).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=EVAL_BUNDLE))
    return ray.get(task.remote(*args))


def _evaluate_here(cfg_dict: dict[str, Any], wanted: dict[str, str],
                   synthetic: dict[str, Any] | None,
                   on_gpu: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The evaluation's body: on the GPU Ray assigned to this task (`on_gpu`), else on
    CPU (also in a driver that holds GPUs of its own: the config asked for none)."""
    from orchestrator.pipeline import stages as S
    from orchestrator.pipeline.evaluate_stage import evaluate_labelled

    cfg = ExperimentConfig.model_validate(cfg_dict)
    # evaluate_labelled evaluates on "cuda" exactly when evaluate.num_gpus > 0, i.e. `on_gpu`,
    # which runs here only in the bundle task that Ray gave the GPU(s).
    if on_gpu and assigned_device() != "cuda":
        from orchestrator.errors import LetheError

        raise LetheError("the trial's evaluation task reserved evaluate.num_gpus="
                         f"{cfg.evaluate.num_gpus} but Ray assigned it no GPU")
    syn = None if synthetic is None else S.StageOut(synthetic["key"], Path(synthetic["dir"]),
                                                    synthetic["cached"])
    results, dirs = evaluate_labelled(cfg, wanted, syn, in_process=True)
    return results, {k: str(v) for k, v in dirs.items()}


def evaluate_in_trial(cfg: ExperimentConfig, wanted: dict[str, str],
                      synthetic: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Path]]:
    """The trial's evaluation of {label: model dir}: in the reserved GPU bundle when it
    evaluates on GPUs, else here in the driver (on CPU)."""
    if evaluates_on_gpu(cfg):
        ev = cfg.evaluate
        results, dirs = run_in_eval_bundle(_evaluate_here, cfg.to_dict(), wanted, synthetic,
                                           True, num_cpus=ev.num_cpus, num_gpus=ev.num_gpus)
    else:
        results, dirs = _evaluate_here(cfg.to_dict(), wanted, synthetic, False)
    return results, {k: Path(v) for k, v in dirs.items()}
