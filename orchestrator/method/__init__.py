"""The method core: per-token loss, score, objective, lambda schedules, partition (no Ray/MLflow).

Taheri et al., "Forgetting: A New Mechanism Towards Better Large Language Model
Fine-tuning", TMLR 2026, arXiv 2508.04329. Where each piece of the paper lives:
token loss (next-token CE of a response token) in token_loss.py, the score
CE_base - CE_ref in score.py, the global rho threshold in partition.py, the lambda
schedule in schedules.py and the objective mean_pos CE - lambda * mean_neg CE in
objective.py.
"""

from orchestrator.method.objective import ObjectiveOutput, forgetting_objective
from orchestrator.method.partition import (
    check_finite,
    global_threshold,
    partition_global,
    partition_per_sample,
    partition_stats,
)
from orchestrator.method.schedules import lambda_at
from orchestrator.method.score import token_scores
from orchestrator.method.token_loss import (
    aligned_token_ce,
    chunked_token_ce,
    decoder_token_ce,
    prediction_rows,
    shift_aligned,
    shift_targets,
    unshift_losses,
)

__all__ = [
    "ObjectiveOutput",
    "aligned_token_ce",
    "check_finite",
    "chunked_token_ce",
    "decoder_token_ce",
    "forgetting_objective",
    "global_threshold",
    "lambda_at",
    "partition_global",
    "partition_per_sample",
    "partition_stats",
    "prediction_rows",
    "shift_aligned",
    "shift_targets",
    "token_scores",
    "unshift_losses",
]
