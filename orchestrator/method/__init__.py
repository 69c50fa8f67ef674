"""The method core: per-token loss, objective, lambda schedules, partition (no Ray/MLflow)."""

from orchestrator.method.objective import ObjectiveOutput, forgetting_objective
from orchestrator.method.partition import (
    check_finite,
    global_threshold,
    partition_global,
    partition_per_sample,
    partition_stats,
)
from orchestrator.method.schedules import lambda_at
from orchestrator.method.token_loss import (
    chunked_token_ce,
    shift_aligned,
    shift_targets,
    unshift_losses,
)

__all__ = [
    "ObjectiveOutput",
    "check_finite",
    "chunked_token_ce",
    "forgetting_objective",
    "global_threshold",
    "lambda_at",
    "partition_global",
    "partition_per_sample",
    "partition_stats",
    "shift_aligned",
    "shift_targets",
    "unshift_losses",
]
