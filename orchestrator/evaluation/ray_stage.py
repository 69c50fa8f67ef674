"""Ray wrapper around the plain evaluator: one Ray task per model, run in parallel.

Ray is imported only inside `evaluate_many`, so `orchestrator.evaluation.runner` stays
usable on a machine (or in a debugger) without Ray.
"""

from __future__ import annotations

from orchestrator.config import EvaluateConfig
from orchestrator.evaluation.runner import evaluate_model


def _evaluate_remote_body(model_dir: str, cfg_dict: dict, include_path: str | None) -> dict:
    # The config travels as a plain dict: pydantic models pickle fine, but a dict keeps the
    # task payload independent of the driver's class objects.
    cfg = EvaluateConfig.model_validate(cfg_dict)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    return evaluate_model(model_dir, cfg, include_path, device=device)


def evaluate_many(model_dirs: dict[str, str], cfg: EvaluateConfig,
                  include_path: str | None) -> dict[str, dict]:
    """{name: model_dir} -> {name: {task: {metric: value}}}, one Ray task per model.

    Uses the running Ray instance (or starts a local one, as `ray.remote` does).
    A failing model raises here with its name, after the others finished.
    """
    import ray

    remote_fn = ray.remote(_evaluate_remote_body).options(
        num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus, name="lethe-evaluate"
    )
    cfg_dict = cfg.model_dump(mode="json")
    refs = {name: remote_fn.remote(path, cfg_dict, include_path)
            for name, path in model_dirs.items()}
    results: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}
    for name, ref in refs.items():
        try:
            results[name] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - collect all, report together
            errors[name] = exc
    if errors:
        first = next(iter(errors))
        raise RuntimeError(
            f"evaluation failed for {sorted(errors)}: {first}: {errors[first]}"
        ) from errors[first]
    return results
