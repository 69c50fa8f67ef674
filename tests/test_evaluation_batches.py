"""Evaluation spread over a few Ray tasks, several models per task, and a failing model that
does not lose the others' results."""

from __future__ import annotations

import pytest
from test_evaluation import eval_files, tiny_model_dir  # noqa: F401 - fixtures

from orchestrator.config import EvaluateConfig
from orchestrator.evaluation import MC_TASK
from orchestrator.evaluation.ray_stage import (
    EvaluationFailed,
    evaluate_many,
    parallel_tasks,
    split_round_robin,
)


def test_tasks_fit_the_cluster_and_cover_every_model():
    cpu = EvaluateConfig(tasks=[MC_TASK], num_cpus=1.0)
    assert parallel_tasks(cpu, 30, {"CPU": 5.0}) == 4  # one slot left for the driver
    assert parallel_tasks(cpu, 2, {"CPU": 5.0}) == 2
    assert parallel_tasks(cpu, 30, {"CPU": 1.0}) == 1
    gpu = EvaluateConfig(tasks=[MC_TASK], num_gpus=1.0)
    assert parallel_tasks(gpu, 30, {"CPU": 64.0, "GPU": 8.0}) == 8
    names = [f"m{i}" for i in range(7)]
    chunks = split_round_robin(names, 3)
    assert len(chunks) == 3 and sorted(sum(chunks, [])) == names


@pytest.mark.ray
def test_a_failing_model_keeps_the_finished_ones(ray_local, tiny_model_dir, eval_files,  # noqa: F811
                                                 tmp_path):
    cfg = EvaluateConfig(tasks=[MC_TASK], limit=3, batch_size=4, num_cpus=0.5)
    with pytest.raises(EvaluationFailed) as failed:
        evaluate_many({"good": tiny_model_dir, "also-good": tiny_model_dir,
                       "missing": str(tmp_path / "no-such-model")}, cfg,
                      str(eval_files["include"]))
    assert set(failed.value.errors) == {"missing"}
    assert set(failed.value.results) == {"good", "also-good"}
    assert failed.value.results["good"] == failed.value.results["also-good"]
    assert "missing" in str(failed.value)
