"""When a model family's training stages share one Ray Train run (training/session.py).

A family's reference and its method x seed jobs then pay one worker-group start-up, started
while the base model is still being built. Used when it cannot cost anything:

- training on CPU (`train.use_gpu` false): a session keeps its workers' resources between
  the reference and the training stage, and on GPUs those are the devices scoring needs;
- `ray.max_parallel_trainings` 1: the jobs train one after the other in one group anyway;
- a `lethe run` that goes past the data stages.

Anything else (GPU training, several runs per family, Tune trials) starts a run per stage,
as `pipeline/stages.py` does without a session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from orchestrator.cache import content_hash
from orchestrator.config import ExperimentConfig, ModelSpec
from orchestrator.pipeline import stages as S


def wants_session(cfg: ExperimentConfig, until: str | None) -> bool:
    return (not cfg.train.use_gpu and cfg.ray.max_parallel_trainings == 1
            and until not in ("data",))


@contextlib.contextmanager
def family_session(cfg: ExperimentConfig, spec: ModelSpec, rows_ident: Any,
                   until: str | None) -> Iterator[Any]:
    """The family's TrainingSession (closed on exit), or None when stages run their own.

    Started at once when the base model still has to be built, so the worker group's
    start-up overlaps the build; otherwise on its first job (a rerun whose trainings are
    all cached starts nothing)."""
    if not wants_session(cfg, until):
        yield None
        return
    from orchestrator.training.session import TrainingSession, session_name

    # Named by the base model it fine-tunes: a rerun finds the interrupted job's checkpoints.
    key = content_hash(S.base_inputs(cfg, spec, rows_ident))
    session = TrainingSession(session_name(spec.name, key), S.stages_root(cfg) / "sessions")
    with session:
        if cfg.ray.prestart_training and not S.base_built(cfg, spec, rows_ident):
            session.prestart(cfg.train)
        yield session
