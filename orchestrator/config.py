"""Experiment configuration: pydantic models, YAML loading and dotted CLI overrides.

Every section forbids unknown keys, so a typo (`train.lrr`) fails at load time with the
key and the allowed names instead of being silently ignored.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.config_models import (  # noqa: F401 - re-exported: the config's public names
    GGUF_MAGIC,
    ConfigError,
    DType,
    Family,
    GGUFSource,
    Method,
    ModelSpec,
    Strict,
    WarmupConfig,
    path_component,
)
from orchestrator.config_runtime import (  # noqa: F401 - re-exported
    BenchmarkSpec,
    EvaluateConfig,
    RayConfig,
    TrackingConfig,
    TuneConfig,
)
from orchestrator.config_sections import (  # noqa: F401 - re-exported
    DataConfig,
    LambdaConfig,
    LoraConfig,
    PartitionConfig,
    ReferenceConfig,
    ScoringConfig,
    SyntheticConfig,
    TrainConfig,
)


class ExperimentConfig(Strict):
    """One experiment: its data, model families, the method's stages and the resources."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """The run's folder under run_dir and (by default) its MLflow experiment."""
    run_dir: str = "runs"
    """Where stage outputs, the tracking store and reports go."""
    seed: int = 0
    """Seed of model building and the base warm-up; the sweep's search seed."""
    seeds: list[int] | None = None
    """Training seeds per (model, method); None = [train.seed]. Several seeds give the
    comparison table its spread."""
    data: DataConfig = DataConfig()
    """The training rows (orchestrator/data)."""
    models: list[ModelSpec]
    """The model families; each runs the whole chain."""
    reference: ReferenceConfig = ReferenceConfig()
    """The reference model that scores tokens against the base."""
    scoring: ScoringConfig = ScoringConfig()
    """Per-token losses of base and reference."""
    partition: PartitionConfig = PartitionConfig()
    """Positive / negative split of the scored tokens."""
    train: TrainConfig = TrainConfig()
    """Fine-tuning with each method."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """lm-eval on every model."""
    tune: TuneConfig = TuneConfig()
    """`lethe tune`'s sweep."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow."""
    ray: RayConfig = RayConfig()
    """The Ray instance and parallelism."""

    _name_is_component = field_validator("name")(path_component)

    @model_validator(mode="after")
    def _unique_model_names(self) -> ExperimentConfig:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"models: duplicate names {sorted(dup)}")
        if not self.models:
            raise ValueError("models: at least one model is required")
        return self

    @model_validator(mode="after")
    def _warmup_needs_synthetic(self) -> ExperimentConfig:
        # The warm-up draws from the synthetic task generators and must avoid the corpus's
        # held-out questions, which only the synthetic source defines.
        warm = [m.name for m in self.models if m.warmup is not None]
        if warm and self.data.source != "synthetic":
            raise ValueError(f"models {warm}: warmup needs data.source 'synthetic' "
                             f"(got '{self.data.source}')")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML aliases (`lambda`), suitable for hashing and MLflow params."""
        return self.model_dump(mode="json", by_alias=True)


# ----------------------------------------------------------------------------- loading


def _model_for_path(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic class that owns the container at `loc` (for listing allowed keys)."""
    cls: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = None
        for fname, f in cls.model_fields.items():
            if part in (fname, f.alias):
                field = f
                break
        if field is None:
            return None
        ann = field.annotation
        # unwrap Optional[X] / list[X]
        for arg in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(arg, "__args__", None)
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cls = arg
                break
            if inner:
                sub = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
                if sub:
                    cls = sub[0]
                    break
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            owner = _model_for_path(loc[:-1])
            if owner is not None:
                allowed = sorted(f.alias or n for n, f in owner.model_fields.items())
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                msg = f"unknown key{hint}; allowed keys: {', '.join(allowed)}"
        elif "input" in e and e["type"] not in ("missing",):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML: {exc}") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = out
        for i, p in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override '{item}': '{where}' is not a valid list index")
                node = node[int(p)]
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{item}': '{where}' is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override '{item}': '{last}' is not a valid list index")
            node[int(last)] = value
        else:
            node[last] = value
    return out


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config and apply dotted overrides (`train.lr=3e-4`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides or []))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
