"""The sweep's seeded proposals. The sweep itself (2 trials on the tiny model: MLflow runs
with distinct hyperparameters, a valid best config, the scores reused) runs in
tests/test_pipeline.py on the finished pipeline run's directory, which already holds the
reference and scores it shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_sweep_proposals_are_seeded_from_the_config_seed():
    """Two sweeps of one config propose the same trials; another seed proposes others."""
    from orchestrator.tune.sweep import proposed_trials

    cfg = load_config(REPO / "configs" / "tune-demo.yaml")
    first, again = proposed_trials(cfg), proposed_trials(cfg)
    assert len(first) == cfg.tune.num_samples == 6
    assert first == again
    lo, hi = cfg.tune.lambda_max
    assert all(lo <= p["lambda_max"] <= hi and 0.5 <= p["rho"] <= 0.9 for p in first)
    assert len({(p["lambda_max"], p["rho"]) for p in first}) == 6
    other = proposed_trials(load_config(REPO / "configs" / "tune-demo.yaml", ["seed=1"]))
    assert other != first
    with_terms = load_config(REPO / "configs" / "tune-demo.yaml",
                             ["tune.negative_terms=[ascent,unlikelihood]"])
    assert proposed_trials(with_terms) == proposed_trials(with_terms)
    assert {p["negative_term"] for p in proposed_trials(with_terms, 20)} == {"ascent", "unlikelihood"}


def test_optuna_search_is_seeded_too():
    pytest.importorskip("optuna")
    from orchestrator.tune.sweep import search_algorithm

    cfg = load_config(REPO / "configs" / "tune-demo.yaml", ["tune.search_alg=optuna", "seed=7"])
    assert search_algorithm(cfg)._seed == 7
