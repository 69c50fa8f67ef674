"""The chain every command shares: data -> base -> tokens -> reference -> scores.

`lethe run` (pipeline/run.py) continues it with partition, training and evaluation; a
sweep (tune/sweep.py) runs it once before its trials; `lethe inspect` needs it up to the
tokens. Each step is a cached stage (pipeline/stages.py), so a second caller finds the
first one's work done. Spans go to the running pipeline's timeline (a throwaway one outside
`lethe run`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.config import ExperimentConfig, ModelSpec
from orchestrator.names import Until
from orchestrator.pipeline import source_stages as D
from orchestrator.pipeline import stages as S
from orchestrator.pipeline import timeline

# Where the chain ends for each `until`: data stops after the tokens; anything past the
# scores (partition, train, evaluate, None) needs the whole chain.
_STOPS: dict[str, int] = {"data": 0, "reference": 1, "score": 2}


@dataclass(frozen=True)
class Source:
    """The training rows every model family reads (and the synthetic stage, if any)."""

    synthetic: S.StageOut | None
    rows: str
    valid_rows: str | None
    ident: Any  # the rows' identity in downstream cache keys


@dataclass
class ModelStages:
    """One model family's upstream stages; the ones past `until` are None."""

    spec: ModelSpec
    source: Source
    base: S.StageOut
    tokens: S.StageOut
    valid: S.StageOut | None
    reference: S.StageOut | None = None
    scores: S.StageOut | None = None

    @property
    def base_model(self) -> str:
        """The base model's folder (or hub id)."""
        return S.model_path(self.base)


def source(cfg: ExperimentConfig) -> Source:
    """The synthetic corpus (when the config uses it) and the training / validation rows."""
    with timeline.current().span("synthetic", "-", "data"):
        synthetic = D.synthetic_stage(cfg) if cfg.data.source == "synthetic" else None
    rows, valid_rows, ident = D.source_rows(cfg, synthetic)
    return Source(synthetic, rows, valid_rows, ident)


def upstream(cfg: ExperimentConfig, model: ModelSpec, until: Until | None = None, *,
             src: Source | None = None, track: Any = None,
             slots: contextlib.AbstractContextManager[Any] | None = None,
             session: Any = None) -> ModelStages:
    """Run (or find cached) `model`'s chain as far as `until` asks.

    `track` (PipelineTracking) gives the reference training its MLflow run; `slots` caps
    the Ray Train runs in flight (pipeline/run.TrainingSlots); `session` is the family's
    running Ray Train run the reference joins (pipeline/sessions.py), None for its own run.
    """
    src = src if src is not None else source(cfg)
    stop = _STOPS.get(until or "", len(_STOPS))
    tl, name = timeline.current(), model.name
    with tl.span("base", name, "startup"):
        base = S.base_stage(cfg, model, src.rows, src.ident)
    if not base.cached:  # a warm-up trains the base: model compute like any training
        warm = S.stage_summary(base).get("warmup") or {}
        if "started_at" in warm and "trained_at" in warm:
            tl.add("base", name, "compute", warm["started_at"], warm["trained_at"])
    with tl.span("tokens", name, "data"):
        tokens = S.tokens_stage(cfg, base, src.rows, src.ident, split="train")
        valid = (S.tokens_stage(cfg, base, src.valid_rows, src.ident, split="clean_valid")
                 if src.valid_rows else None)
    out = ModelStages(model, src, base, tokens, valid)
    if stop < 1:
        return out
    with slots if slots is not None else contextlib.nullcontext(), tl.span("reference", name):
        target = track.target(model, "reference", cfg.reference.seed) if track else None
        out.reference = S.reference_stage(cfg, model, base, tokens, valid, target, session)
    tl.add_training("reference", name,
                    S.stage_metrics(out.reference) if not out.reference.cached else {})
    if stop < 2:
        return out
    t_score = time.time()
    with tl.span("score", name):
        out.scores = S.score_stage(cfg, base, out.reference, tokens)
    if not out.scores.cached:
        tl.add_scoring("score", name, t_score, S.scoring_summary(out.scores))
    return out
