"""Experiment configuration: pydantic models, YAML loading and dotted CLI overrides.

Every section forbids unknown keys, so a typo (`train.lrr`) fails at load time with the
key and the allowed names instead of being silently ignored.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

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


class SyntheticConfig(Strict):
    num_train: int = Field(default=2000, ge=1)
    num_eval: int = Field(default=200, ge=1)
    noise_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    noise_kinds: list[Literal["wrong_value", "filler", "typo"]] = ["wrong_value", "filler", "typo"]
    tasks: list[Literal["arithmetic", "world_facts", "list_ops", "string_ops"]] = [
        "arithmetic",
        "world_facts",
        "list_ops",
        "string_ops",
    ]
    seed: int = 0


class DataConfig(Strict):
    source: Literal["synthetic", "file", "hf"] = "synthetic"
    path: str | None = None  # jsonl / json / parquet file, or a datasets name / directory
    split: str = "train"
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    chat_template: Literal["paper", "tokenizer"] = "paper"
    max_seq_len: int = Field(default=512, ge=8)
    max_rejected_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    # A seeded random sample of this many source rows (orchestrator/data/sampling.py), never
    # the first N: sources such as the Tulu mixture are stored grouped by origin.
    limit: int | None = Field(default=None, ge=1)
    limit_seed: int = 0
    # Draw the sample (and train.validation_size) proportionally to this column's values.
    stratify_by: str | None = None
    # A row (a JSONL line, or a row's message text) longer than this is rejected before it
    # is parsed or tokenized: one runaway row must not exhaust memory. None = no bound.
    max_row_chars: int | None = Field(default=1_000_000, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class LoraConfig(Strict):
    r: int = Field(default=64, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ReferenceConfig(Strict):
    """The reference model: the base fine-tuned with plain SFT on a random subset."""

    subset_fraction: float | None = Field(default=0.2, gt=0.0, le=1.0)
    subset_size: int | None = Field(default=None, ge=1)  # wins over subset_fraction
    # random: the paper's random subset of the pool. clean: the same number of rows drawn
    # from the pool's rows without annotated noise (a trusted clean subset, as Token
    # Cleaning assumes; needs noise annotations, see orchestrator/data/trusted.py).
    subset_source: Literal["random", "clean"] = "random"
    seed: int = 0
    lr: float | None = None  # None = train.lr
    epochs: float | None = None  # None = train.epochs
    lora: LoraConfig | None = None


class ScoringConfig(Strict):
    num_actors: int = Field(default=1, ge=1)
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=256, ge=1)  # rows per Ray Data batch
    token_budget: int = Field(default=16384, ge=64)  # padded tokens per forward pass
    chunk_size: int = Field(default=4096, ge=16)  # rows per cross-entropy chunk
    dtype: DType = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    packing: bool = False


class PartitionConfig(Strict):
    rho: float = Field(default=0.7, ge=0.0, le=1.0)
    mode: Literal["global", "per_sample"] = "global"
    histogram_bins: int = Field(default=100, ge=2)


class LambdaConfig(Strict):
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    t_max: float = Field(default=0.25, ge=0.0)
    t_min: float = Field(default=1e-5, ge=0.0)


class TrainConfig(Strict):
    methods: list[Method] = ["sft", "ignore", "forget"]
    negative_term: Literal["ascent", "unlikelihood"] = "ascent"
    normalization: Literal["global", "micro_batch"] = "global"
    lambda_: LambdaConfig = Field(default=LambdaConfig(), alias="lambda")
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    micro_batch_size: int = Field(default=8, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    seed: int = 42
    lora: LoraConfig | None = None
    deepspeed: str | None = "configs/deepspeed/zero2.json"  # None = plain torch DDP
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.9, gt=0.0)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    checkpoint_every: int = Field(default=0, ge=0)  # optimizer steps; 0 = only at the end
    # ...and at least this often in minutes of training, so a failure never loses a whole
    # run (orchestrator/training/checkpoint_policy.py); None = steps only.
    checkpoint_every_minutes: float | None = Field(default=30.0, gt=0.0)
    max_failures: int = Field(default=0, ge=0)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    loss_chunk_size: int = Field(default=4096, ge=16)
    gradient_checkpointing: bool = False
    dtype: DType = "auto"
    eval_every: int = Field(default=0, ge=0)  # optimizer steps between validation losses
    validation_size: int = Field(default=0, ge=0)  # held-out clean samples for val loss


def _check_limit(value: int | float | None, where: str) -> int | float | None:
    """lm-eval's limit: an integer >= 1 is a number of examples per task, a float in (0, 1)
    a fraction of each task (the paper's script passes `--limit 0.99`)."""
    if value is None or isinstance(value, bool):
        return None if value is None else _bad_limit(value, where)
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    if isinstance(value, int) and value >= 1 or isinstance(value, float) and 0.0 < value < 1.0:
        return value
    return _bad_limit(value, where)


def _bad_limit(value: Any, where: str) -> Any:
    raise ValueError(f"{where}: {value!r} is neither a count >= 1 nor a fraction in (0, 1)")


class BenchmarkSpec(Strict):
    """One headline benchmark: the mean of `metric` over `tasks` (several tasks when a
    benchmark is split per language, as TydiQA's gold-passage tasks are)."""

    tasks: list[str] = Field(min_length=1)
    metric: str  # the metric name as Lethe logs it (lm-eval's key without ",<filter>")


class EvaluateConfig(Strict):
    enabled: bool = True
    # Task names; the embedded default's local tasks are generated from the synthetic
    # corpus's held-out split and found through include_path.
    tasks: list[str] = ["lethe_synth_mc", "lethe_synth_gen"]
    include_path: str | None = None  # None = the generated local task folder
    num_fewshot: dict[str, int] = {}
    batch_size: int = Field(default=16, ge=1)
    limit: int | float | None = None  # per task: a count >= 1 or a fraction in (0, 1)
    task_limit: dict[str, int | float] = {}  # per-task override of `limit`
    # lm-eval's four seeds (python, numpy, torch, few-shot sampling); None = its defaults.
    seed: int | None = None
    # The headline: {name: {tasks, metric}} in display order; `lethe compare` shows each and
    # their average per method (the paper reports the average over five benchmarks).
    benchmarks: dict[str, BenchmarkSpec] = {}
    num_gpus: float = Field(default=0.0, ge=0.0)
    num_cpus: float = Field(default=1.0, gt=0.0)
    dtype: DType = "auto"
    evaluate_base: bool = True

    @model_validator(mode="after")
    def _known_tasks(self) -> EvaluateConfig:
        self.__dict__["limit"] = _check_limit(self.limit, "evaluate.limit")
        for task, value in self.task_limit.items():
            self.task_limit[task] = _check_limit(value, f"evaluate.task_limit.{task}")
        known = set(self.tasks)
        named = [("num_fewshot", t) for t in self.num_fewshot] + [
            ("task_limit", t) for t in self.task_limit] + [
            (f"benchmarks.{b}.tasks", t) for b, spec in self.benchmarks.items() for t in spec.tasks]
        for where, task in named:
            if task not in known:
                raise ValueError(f"evaluate.{where}: task '{task}' is not in evaluate.tasks "
                                 f"({', '.join(self.tasks)})")
        return self


class TuneConfig(Strict):
    num_samples: int = Field(default=6, ge=1)
    lambda_max: tuple[float, float] = (0.01, 1.0)  # log-uniform range of the ramp's maximum
    rho: tuple[float, float] = (0.5, 0.9)
    negative_terms: list[Literal["ascent", "unlikelihood"]] | None = None
    schedules: list[Literal["linear", "constant", "cosine"]] | None = None
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    search_alg: Literal["random", "optuna"] = "random"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_concurrent_trials: int | None = Field(default=None, ge=1)  # None = GPUs / per trial
    gpus_per_trial: float = Field(default=0.0, ge=0.0)
    cpus_per_trial: float = Field(default=0.01, gt=0.0)


class TrackingConfig(Strict):
    enabled: bool = True
    # None = sqlite file in the run directory, unless MLFLOW_TRACKING_URI is set.
    tracking_uri: str | None = None
    experiment: str | None = None  # None = the config's name


class RayConfig(Strict):
    address: str | None = None  # None = start or join a local instance
    num_cpus: int | None = None  # for a local instance (logical slots, may exceed cores)
    # Model families whose chains (reference -> score -> partition -> train -> eval) run at
    # the same time. On a cluster the chains share the GPUs through Ray's scheduler; on a
    # laptop running them side by side hides Ray Train's per-run start-up latency.
    max_parallel_models: int = Field(default=1, ge=1)
    # Ray Train runs in flight per model family. Each run trains its share of the family's
    # methods x seeds one after the other in one worker group (one start-up per run): 1 on a
    # small machine; on a cluster, as many as there are worker groups' worth of GPUs.
    max_parallel_trainings: int = Field(default=1, ge=1)


class ExperimentConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    run_dir: str = "runs"
    seed: int = 0
    # Training seeds per (model, method); None = [train.seed]. Several seeds give the
    # comparison table its spread.
    seeds: list[int] | None = None
    data: DataConfig = DataConfig()
    models: list[ModelSpec]
    reference: ReferenceConfig = ReferenceConfig()
    scoring: ScoringConfig = ScoringConfig()
    partition: PartitionConfig = PartitionConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

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
