"""Evaluation with lm-eval: local task YAMLs, the plain runner, and the Ray task wrapper."""

from orchestrator.evaluation.ray_stage import evaluate_many
from orchestrator.evaluation.runner import evaluate_model
from orchestrator.evaluation.tasks import GEN_TASK, MC_TASK, write_local_tasks

__all__ = ["evaluate_model", "evaluate_many", "write_local_tasks", "MC_TASK", "GEN_TASK"]
