"""What a pipeline stage produced: `StageOut` (its key and folder) and the readers of what
finished stages recorded (`_SUCCESS.json`, `inputs.json`).

The stage functions that compute and open stages are in pipeline/stages.py, which
re-exports these names (callers use `stages.model_path`, `stages.StageOut`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cache import Stage
from orchestrator.config import ExperimentConfig, ModelSpec


@dataclass(frozen=True)
class StageOut:
    """Where a stage's output lives and the key that names it (used by downstream keys)."""

    key: str
    dir: Path
    cached: bool


def stages_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run_dir).resolve() / cfg.name / "stages"


def model_path(out: StageOut) -> str:
    """The model directory (or hub id) a base / train stage produced."""
    summary = json.loads((out.dir / "_SUCCESS.json").read_text())
    return str(summary["model_path"])


def _spec_of(base: StageOut) -> ModelSpec:
    """The base stage's model spec, pinned to the commit its hub id resolved to."""
    inputs = json.loads((base.dir / "inputs.json").read_text())
    return pinned_spec(ModelSpec.model_validate(inputs["spec"]), base)


def base_revision(base: StageOut) -> str | None:
    """The commit a hub model id resolved to when its base stage ran (None for a local
    folder, a GGUF file or a model built from config)."""
    return stage_summary(base).get("revision")


def pinned_spec(spec: ModelSpec, base: StageOut) -> ModelSpec:
    """`spec` with its hub revision pinned to what the base stage recorded: the reference,
    the trainings, the scorer and the evaluation then load the same commit, even after the
    hub's branch has moved."""
    revision = base_revision(base)
    return spec if revision is None else spec.model_copy(update={"revision": revision})


def scores_path(scores: StageOut) -> Path:
    return Path(json.loads((scores.dir / "_SUCCESS.json").read_text())["scores_path"])


def scoring_summary(scores: StageOut) -> dict[str, Any]:
    """What the scoring run reported (tokens, tokens/s, padding, timings)."""
    path = scores_path(scores) / "_SUCCESS.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def partition_report(partition: StageOut) -> dict[str, Any]:
    return dict(json.loads((partition.dir / "_SUCCESS.json").read_text())["report"])


def stage_summary(out: StageOut) -> dict[str, Any]:
    """What the stage recorded when it finished (its `_SUCCESS.json`)."""
    return dict(json.loads((out.dir / "_SUCCESS.json").read_text()))


def stage_metrics(out: StageOut) -> dict[str, Any]:
    return dict(json.loads((out.dir / "_SUCCESS.json").read_text()).get("metrics", {}))


def find_done(cfg: ExperimentConfig, name: str, match: dict[str, Any]) -> Stage | None:
    """The newest finished stage of `name` whose inputs contain `match` (for inspection
    commands that know some, not all, of a stage's inputs)."""
    folder = stages_root(cfg) / name
    candidates = sorted(folder.glob("*/inputs.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        inputs = json.loads(path.read_text())
        if all(inputs.get(k) == v for k, v in match.items()):
            st = Stage(stages_root(cfg), name, inputs)
            if st.done():
                return st
    return None
