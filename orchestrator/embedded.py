"""Whether a Lethe process runs on the embedded local Ray instance or in a cluster job, and
the environment defaults that belong to the embedded instance only.

The embedded instance (`lethe run` on a laptop or a CI machine: no `ray.address`, no
RAY_ADDRESS) works from local files, so it runs with the Hugging Face hub and datasets
offline by default: a missing local file fails at once instead of starting a download. A
cluster job (`ray job submit` / `python -m jobs.submit` of a jobs/*.py entry point, a KubeRay
RayJob, `lethe run` with `ray.address` naming a cluster) reads hub models and datasets, so
none of those switches is set for it: whatever the nodes' environment or the job's runtime
env says decides (nothing, on the shipped cluster files: online).

`ray job submit` starts the entry point with RAY_ADDRESS set to the cluster (Ray's job
supervisor does it, KubeRay's submitter included), which is how a jobs/*.py driver knows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

# Set in the environment of the embedded instance (driver, raylet, every worker); read by
# code that runs in workers (training/ray_entry.py, evaluation/runner.py).
EMBEDDED_ENV = "LETHE_EMBEDDED_RAY"
# The offline switches the embedded instance defaults to "1" (never set for a cluster job).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def joins_cluster(address: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """True when the run's Ray is a cluster: `address` (ray.address, `lethe plan --address`)
    names one (anything but empty or "local"), or RAY_ADDRESS is set (the driver of a
    `ray job submit` job, or a shell that points every Ray client at a cluster)."""
    env = os.environ if environ is None else environ
    named = (address or "").strip()
    return (bool(named) and named != "local") or bool(env.get("RAY_ADDRESS", "").strip())


def in_embedded_instance(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process of the embedded instance (its driver sets EMBEDDED_ENV before
    starting Ray; the local raylet and every worker inherit it)."""
    env = os.environ if environ is None else environ
    return env.get(EMBEDDED_ENV) == "1"


def environment_defaults(embedded: bool, environ: MutableMapping[str, str] | None = None) -> None:
    """The CLI's defaults, each left alone when the user has set it. Call before anything
    imports `huggingface_hub` or `datasets` (both read their offline switch at import).

    Everywhere: no usage stats, no tokenizer thread pools in forked workers, no MLflow
    server job runner. Embedded only: hub and datasets offline, DeepSpeed's accelerator from
    this machine, its JIT extensions under ./.cache. A cluster job gets none of the latter:
    its workers are other machines (a CPU head's "cpu" would reach GPU workers through
    `ray.address`), and DeepSpeed picks the accelerator of the machine it runs on.
    """
    env = os.environ if environ is None else environ
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if not embedded:
        return
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    if "DS_ACCELERATOR" not in env:
        try:
            import torch

            env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
