"""Token scoring: the plain TokenScorer and the Ray Data stage around it.

Names resolve lazily, so `from orchestrator.scoring.scorer import TokenScorer` (e.g. on a GPU
box without Ray or pyarrow) does not import the stage module. Ray itself is imported only
inside `run_scoring`.
"""

from __future__ import annotations

from orchestrator.lazy import lazy_exports

_EXPORTS = {
    "TokenScorer": "orchestrator.scoring.scorer",
    "plan_micro_batches": "orchestrator.scoring.scorer",
    "run_scoring": "orchestrator.scoring.stage",
    "score_files": "orchestrator.scoring.blocks",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
