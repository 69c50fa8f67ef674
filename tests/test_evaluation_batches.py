"""Evaluation over a pool of Ray actors (evaluation/ray_stage.py): the pool's size comes from
the config's cap, a failing model does not lose the others' results, and a killed worker
process is retried once before its model is reported failed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_evaluation_local import eval_files, tiny_model_dir  # noqa: F401 - fixtures

from orchestrator.config import EvaluateConfig
from orchestrator.evaluation import MC_TASK
from orchestrator.evaluation.ray_stage import (
    EvaluationFailed,
    EvaluationWorker,
    evaluate_many,
    pool_size,
)


def test_pool_size_is_the_configs_cap():
    cfg = EvaluateConfig(tasks=[MC_TASK])
    assert cfg.max_workers == 4  # the default `lethe validate` prints
    assert pool_size(cfg, 30) == 4 and pool_size(cfg, 2) == 2 and pool_size(cfg, 0) == 1
    assert pool_size(cfg, 30, max_workers=1) == 1  # a family's share of the cap
    assert pool_size(EvaluateConfig(tasks=[MC_TASK], max_workers=8, num_gpus=1), 30) == 8


@pytest.mark.ray
def test_a_failing_model_keeps_the_finished_ones(ray_local, tiny_model_dir, eval_files,  # noqa: F811
                                                 tmp_path):
    cfg = EvaluateConfig(tasks=[MC_TASK], limit=3, batch_size=4, num_cpus=0.5, max_workers=2)
    with pytest.raises(EvaluationFailed) as failed:
        evaluate_many({"good": tiny_model_dir, "also-good": tiny_model_dir,
                       "missing": str(tmp_path / "no-such-model")}, cfg,
                      str(eval_files["include"]))
    assert set(failed.value.errors) == {"missing"}
    assert set(failed.value.results) == {"good", "also-good"}
    assert failed.value.results["good"] == failed.value.results["also-good"]
    assert "missing" in str(failed.value)


def _marking_worker(marks: Path) -> type:
    """An EvaluationWorker that leaves `<model>-<pid>-<n>` in `marks` when it starts a model,
    then waits 2 s before evaluating (time for a kill to land mid-model). Defined in a
    function, so Ray ships the class by value."""

    class MarkingWorker(EvaluationWorker):
        def evaluate(self, name, path, revision):
            (marks / f"{name}-{os.getpid()}-{time.time_ns()}").touch()
            time.sleep(2.0)
            return super().evaluate(name, path, revision)

    return MarkingWorker


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_is_retried_once_then_its_model_fails(
        ray_local, tiny_model_dir, eval_files, tmp_path):  # noqa: F811
    """One actor, models a then b. The worker is SIGKILLed (by PID) on a's first try: Ray
    restarts it and a is evaluated again, successfully. It is killed on both of b's tries:
    b is reported failed (died twice), a's results are kept."""
    marks = tmp_path / "marks"
    marks.mkdir()
    kills = {"a": 1, "b": 2}  # kills per model
    killed: list[str] = []
    stop = threading.Event()

    def killer() -> None:
        seen: set[str] = set()
        while not stop.is_set():
            for mark in sorted(marks.iterdir()):
                if mark.name in seen:
                    continue
                seen.add(mark.name)
                name, pid, _ = mark.name.split("-")
                if kills[name] > 0:
                    kills[name] -= 1
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(f"{name}:{pid}")
            time.sleep(0.05)

    cfg = EvaluateConfig(tasks=[MC_TASK], limit=3, batch_size=4, num_cpus=0.5, max_workers=1)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    t0 = time.time()
    try:
        with pytest.raises(EvaluationFailed) as failed:
            evaluate_many({"a": tiny_model_dir, "b": tiny_model_dir}, cfg,
                          str(eval_files["include"]), worker_cls=_marking_worker(marks))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [k.split(":")[0] for k in killed] == ["a", "b", "b"], killed
    assert set(failed.value.results) == {"a"} and 0.0 <= failed.value.results["a"][MC_TASK]["acc"] <= 1.0
    assert set(failed.value.errors) == {"b"}
    assert "evaluation worker died 2 times" in failed.value.errors["b"]
    tries = sorted(m.name.split("-")[0] for m in marks.iterdir())
    assert tries == ["a", "a", "b", "b"]  # each model tried twice, no more
    print(f"\n[drill] evaluation worker killed 3 times; evaluate_many returned in "
          f"{time.time() - t0:.1f} s")
