"""A family is evaluated as soon as its chain is done (pipeline/evaluate_stage.py): the
families share the evaluation workers (the config's cap), and an early failure is left to the final
pass, which owns the error."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.pipeline import evaluate_stage
from orchestrator.pipeline.run import ModelOutcome


@pytest.fixture
def demo_cfg(tmp_path):
    return load_config("configs/demo.yaml", [f"run_dir={tmp_path}", "ray.max_parallel_models=3"])


def _outcome(cfg) -> ModelOutcome:
    out = ModelOutcome(cfg.models[0], base_model="/m/base")
    out.models = {("sft", 0): "/m/sft", ("forget", 0): "/m/forget"}
    return out


def test_families_share_the_evaluation_workers(demo_cfg, monkeypatch):
    seen = {}
    monkeypatch.setattr(evaluate_stage, "evaluate_labelled",
                        lambda cfg, wanted, synthetic, revisions, max_workers:
                        seen.update(wanted=wanted, max_workers=max_workers))
    evaluate_stage.evaluate_family_early(demo_cfg, _outcome(demo_cfg), None)
    name = demo_cfg.models[0].name
    assert seen["wanted"] == {f"{name}/base/-": "/m/base", f"{name}/forget/s0": "/m/forget",
                              f"{name}/sft/s0": "/m/sft"}
    # The config's cap (evaluate.max_workers, default 4) shared by 3 families: one each.
    assert demo_cfg.evaluate.max_workers == 4 and seen["max_workers"] == 1


def test_an_early_failure_is_reported_and_left_to_the_final_pass(demo_cfg, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("lm-eval exploded\nsecond line")

    monkeypatch.setattr(evaluate_stage, "evaluate_labelled", fail)
    evaluate_stage.evaluate_family_early(demo_cfg, _outcome(demo_cfg), None)  # does not raise
    out = capsys.readouterr().out
    assert "failed early (RuntimeError: lm-eval exploded); retried in the final pass" in out
