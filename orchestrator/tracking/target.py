"""What every MLflow writer shares, driver and training rank 0 alike (no mlflow import here).

- `TrackingTarget`: where a run lives, as JSON-safe data. The driver's `RunLogger` logs
  into it synchronously; a training worker's `ResilientRun` (rank 0) logs into it from a
  background thread, or creates the run first when `run_id` is None.
- `param_value` / `loggable_metrics` / `flatten_config`: how params and metrics are
  written: secrets masked, one length cap, only finite numbers, MLflow-safe keys.
- `RunLabel`: the name of a (model, method, seed) run, built and read in one place.
- `NullRun`: the one way "tracking disabled" is expressed: every logging call does nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import masking

PARAM_VALUE_MAX = 500
TRUNCATION_MARKER = "...[truncated]"
PARAMS_PER_BATCH = 100  # MLflow rejects more per log_batch
METRICS_PER_BATCH = 1000
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")
NO_SEED = "-"  # the seed part of a label for runs without one (base model, stage runs)


@dataclass
class TrackingTarget:
    """Everything a Ray worker needs to log into a run (JSON round-trip safe).

    `run_id` None: the worker creates the run (named `run_name`, nested under
    `parent_run_id`, tagged `tags`). `spool_dir`: where operations MLflow did not take are
    kept for `lethe sync` (None: beside a sqlite store, else the system temp dir).
    `flush_timeout_s`: how long the end of training waits for buffered metrics.
    """

    tracking_uri: str
    experiment: str
    run_id: str | None = None
    run_name: str = ""
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    spool_dir: str | None = None
    flush_timeout_s: float | None = None

    def __post_init__(self) -> None:
        self.run_name = self.run_name or ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackingTarget:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def coerce(cls, target: TrackingTarget | dict[str, Any] | None) -> TrackingTarget | None:
        """A target from what travelled to a worker (a dict after JSON), or None."""
        return cls.from_dict(target) if isinstance(target, dict) else target


@dataclass(frozen=True)
class RunLabel:
    """`<model>/<method>/s<seed>` (a trained model), `<model>/base/-` (the base model).

    The text form keys evaluation results and names MLflow runs; `parse` reads it back.
    """

    model: str
    method: str
    seed: str = NO_SEED

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", str(self.seed))

    def __str__(self) -> str:
        return f"{self.model}/{self.method}/{self._seed_part}"

    @property
    def _seed_part(self) -> str:
        return NO_SEED if self.seed == NO_SEED else f"s{self.seed}"

    @property
    def run_name(self) -> str:
        """The MLflow run name: the label without a seed part for seedless runs."""
        base = f"{self.model}/{self.method}"
        return base if self.seed == NO_SEED else f"{base}/{self._seed_part}"

    @classmethod
    def parse(cls, text: str) -> RunLabel:
        model, method, seed = text.split("/")
        return cls(model, method, seed if seed == NO_SEED else seed.removeprefix("s"))


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}, "models": [{"name": "a"}]} -> {"train.lr": 1e-4, "models.0.name": "a"}.

    Lists of scalars stay one value (JSON text); lists of mappings are indexed.
    """
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        if not data and prefix:
            out[prefix] = "{}"
        for key, value in data.items():
            out.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        for i, value in enumerate(data):
            out.update(flatten_config(value, f"{prefix}.{i}"))
    elif isinstance(data, list):
        out[prefix] = json.dumps(data)
    else:
        out[prefix] = data
    return out


def secret_env_values(min_len: int = 6) -> set[str]:
    """Values of environment variables named like credentials (orchestrator.masking's rule)."""
    return masking.secret_env_values(min_len)


def param_value(value: Any, secrets: set[str] | None = None) -> str:
    """MLflow param text: secrets masked (orchestrator.masking, plus `secrets`), at most
    PARAM_VALUE_MAX chars with a visible marker."""
    text = masking.mask_secrets("None" if value is None else str(value), secrets)
    if len(text) > PARAM_VALUE_MAX:
        text = text[: PARAM_VALUE_MAX - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
    return text


def param_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Sorted (key, text) pairs as every writer logs them (secrets from the environment too)."""
    secrets = secret_env_values()
    return [(k, param_value(v, secrets)) for k, v in sorted(params.items())]


def metric_key(key: str) -> str:
    return _METRIC_KEY_BAD.sub("_", key)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def loggable_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric, finite values only (NaN would break comparisons), under MLflow-safe keys."""
    return {metric_key(k): v for k, raw in metrics.items() if (v := _numeric(raw)) is not None}


class NullRun:
    """A run's methods, doing nothing: what every writer gets when tracking is disabled
    (`tracking.enabled: false`, no target handed to a worker, a rank other than 0)."""

    run_id = ""
    target = None

    def close(self, status: str | None = "FINISHED", timeout: float | None = None) -> bool:
        return True  # nothing was buffered

    def __getattr__(self, name: str):
        if name.startswith(("log_", "set_", "end", "wait_")):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
