"""Token scoring: the plain TokenScorer and the Ray Data stage around it (ray imported lazily)."""

from orchestrator.scoring.blocks import score_files
from orchestrator.scoring.scorer import TokenScorer, plan_micro_batches
from orchestrator.scoring.stage import run_scoring

__all__ = ["TokenScorer", "plan_micro_batches", "run_scoring", "score_files"]
