"""Token scoring: the plain TokenScorer and the Ray Data stage around it.

Names resolve lazily, so `from orchestrator.scoring.scorer import TokenScorer` (e.g. on a GPU
box without Ray or pyarrow) does not import the stage module. Ray itself is imported only
inside `run_scoring`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TokenScorer": "orchestrator.scoring.scorer",
    "plan_micro_batches": "orchestrator.scoring.scorer",
    "run_scoring": "orchestrator.scoring.stage",
    "score_files": "orchestrator.scoring.blocks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator.scoring' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
