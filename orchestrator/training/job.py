"""What a training run needs (`TrainJob`) and what it produced (`TrainResult`).

Both are plain dataclasses that round-trip through JSON: config objects travel as dicts
(the pydantic classes validate them again on the way in), so a job can be written beside
its outputs, hashed for the stage cache and sent to Ray workers without pickling classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import ModelSpec, TrainConfig
from orchestrator.names import METHODS
from orchestrator.tracking.target import TrackingTarget

CLASS_COLUMNS = ("token_class", "response_mask")


# Where rank 0 logs the training curves: the tracking layer's target (run_id = the driver's
# run, else a new run nested under parent_run_id; spool_dir for `lethe sync`).
MlflowTarget = TrackingTarget


@dataclass
class SubsetSpec:
    """A seeded random subset of the training pool (the paper's reference-model data).

    `size` (a row count) wins over `fraction`. The same seed and pool give the same rows.
    """

    fraction: float | None = None
    size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size is None and self.fraction is None:
            raise ValueError("subset: set `fraction` or `size`")
        if self.size is not None and self.size < 1:
            raise ValueError(f"subset.size must be >= 1, got {self.size}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"subset.fraction must be in (0, 1], got {self.fraction}")


@dataclass
class TrainJob:
    train_path: str  # parquet: sample_id, input_ids, and the class column
    base_model_path: str  # plain HF folder (or hub id) the run starts from
    model: dict[str, Any]  # ModelSpec as a dict
    train: dict[str, Any]  # TrainConfig as a dict (YAML aliases, e.g. `lambda`)
    method: str  # sft | ignore | forget
    output_dir: str  # export + metrics.json + _SUCCESS.json land here
    run_name: str  # Ray Train run name: rerunning with the same name resumes
    storage_path: str  # Ray Train storage (checkpoints, marker files)
    class_column: str = "token_class"  # or "response_mask" (every response token is +1)
    validation_path: str | None = None  # clean held-out rows; val_loss = mean response CE
    subset: SubsetSpec | None = None
    mlflow: MlflowTarget | None = None
    # Extra Ray Train run callbacks (e.g. Tune's report callback). Objects, not data: they
    # are left out of `to_dict` and never reach the workers.
    callbacks: list[Any] = field(default_factory=list)
    # Test hooks passed to the workers: `_fail_once_at_step` (raise once after that step's
    # checkpoint, marker file in the storage path) and `_nan_at_step` (poison that step).
    test_hooks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.subset, dict):
            self.subset = SubsetSpec(**self.subset)
        if isinstance(self.mlflow, dict):
            self.mlflow = MlflowTarget(**self.mlflow)
        if hasattr(self.model, "model_dump"):
            self.model = self.model.model_dump(mode="json")
        if hasattr(self.train, "model_dump"):
            self.train = self.train.model_dump(mode="json", by_alias=True)
        if self.method not in METHODS:
            raise ValueError(f"TrainJob.method must be one of {METHODS}, got {self.method!r}")
        if self.class_column not in CLASS_COLUMNS:
            raise ValueError(
                f"TrainJob.class_column must be one of {CLASS_COLUMNS}, got {self.class_column!r}"
            )
        if self.method != "sft" and self.class_column == "response_mask":
            raise ValueError(
                f"method {self.method!r} needs per-token classes: class_column='token_class' "
                "(response_mask marks every response token +1)"
            )
        # Validate early, in the driver, so a bad key fails before any worker starts.
        self.model_spec()
        self.train_config()

    def model_spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.model)

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("callbacks")
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        return cls(**d)

    @property
    def export_dir(self) -> Path:
        return Path(self.output_dir) / "model"

    @property
    def success_path(self) -> Path:
        return Path(self.output_dir) / "_SUCCESS.json"


@dataclass
class TrainResult:
    export_dir: str  # plain HF folder (safetensors + tokenizer)
    metrics_path: str  # metrics.json beside the export
    metrics: dict[str, Any]
    steps: int  # optimizer steps taken
    cached: bool = False  # True when an earlier finished export was returned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        return cls(**d)

    @classmethod
    def load(cls, success_path: Path) -> TrainResult:
        body = json.loads(Path(success_path).read_text())
        return cls.from_dict({**body["result"], "cached": True})
