"""A 2-trial Ray Tune sweep on the tiny model: trials become MLflow runs with distinct
hyperparameters, the best configuration loads as a valid config, and scoring ran once.
(Two trials prove all of it; each further trial costs a Ray Train run and an evaluation.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_configs import TINY, runs_frame

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


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_reuses_scores_and_tracks_every_trial(ray_local, tmp_path, capsys):
    from orchestrator.tune.sweep import run_sweep

    raw = dict(TINY, name="tune-test", run_dir=str(tmp_path / "runs"))
    raw["train"] = dict(TINY["train"], methods=["forget"], eval_every=2)
    raw["evaluate"] = dict(TINY["evaluate"], evaluate_base=False)
    raw["tune"] = {"num_samples": 2, "lambda_max": [0.05, 0.5], "rho": [0.5, 0.9],
                   "grace_period": 2, "max_concurrent_trials": 1, "metric": "val_loss"}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)

    out = run_sweep(cfg)

    rows = out["rows"]
    assert len(rows) == 2 and not any(r["error"] for r in rows)
    assert len({(r["lambda_max"], r["rho"]) for r in rows}) == 2
    # The trials that ran are the seeded proposals: a rerun of this config runs the same.
    from orchestrator.tune.sweep import proposed_trials

    assert sorted((r["lambda_max"], r["rho"]) for r in rows) == sorted(
        (p["lambda_max"], p["rho"]) for p in proposed_trials(cfg))
    assert all(0.05 <= r["lambda_max"] <= 0.5 and 0.5 <= r["rho"] <= 0.9 for r in rows)

    best = load_config(out["best_config"])  # a ready, valid experiment config
    assert best.partition.rho == pytest.approx(out["best"]["rho"])
    assert best.train.lambda_.t_max == pytest.approx(out["best"]["lambda_max"])
    assert best.train.methods == ["forget"]

    stages = Path(cfg.run_dir) / cfg.name / "stages"
    assert len(list((stages / "scores").glob("*/_SUCCESS.json"))) == 1  # scored once
    assert len(list((stages / "partition").glob("*/_SUCCESS.json"))) == 2  # one per rho

    runs = runs_frame(f"sqlite:///{cfg.run_dir}/{cfg.name}/mlflow.db", cfg.name)
    trials = runs[runs.get("tags.trial_id").notna()]
    assert len(trials) == 2
    assert trials["tags.rho"].nunique() == 2 and trials["tags.lambda_max"].nunique() == 2
    assert trials["params.train.lambda.t_max"].nunique() == 2  # logged by training's rank 0
    # ASHA may stop weak trials before their training ends; the ones that finish are
    # evaluated, the stopped ones are not.
    finished = [r for r in rows if r["finished"]]
    assert finished
    evaluated = trials["metrics.eval/lethe_synth_mc/acc"].dropna()
    assert len(evaluated) == len(finished) and evaluated.between(0.0, 1.0).all()
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "[lethe] best:" in printed  # the trial table
    assert len(json.loads((Path(cfg.run_dir) / cfg.name / "sweep_trials.json").read_text())) == 2
