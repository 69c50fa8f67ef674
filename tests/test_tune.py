"""The sweep's seeded proposals. The sweep itself (2 trials on the tiny model: MLflow runs
with distinct hyperparameters, a valid best config, the scores reused) runs in
tests/test_pipeline.py on the finished pipeline run's directory, which already holds the
reference and scores it shares."""

from __future__ import annotations

from pathlib import Path

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
    """optuna is a dependency (pyproject): this runs everywhere, never skips."""
    from orchestrator.tune.sweep import search_algorithm

    cfg = load_config(REPO / "configs" / "tune-demo.yaml", ["tune.search_alg=optuna", "seed=7"])
    assert search_algorithm(cfg)._seed == 7


def test_trial_lines_print_one_line_per_trial_start_and_end(capsys):
    """Off a terminal the sweep's log has one line per trial event instead of Tune's boxes."""
    import re
    from types import SimpleNamespace

    from orchestrator.tune.sweep import TUNE_LOG_VERBOSITY, trial_lines

    assert TUNE_LOG_VERBOSITY == 0  # Tune silent apart from a trial's error
    cb = trial_lines("val_loss")
    cfg = {"lambda_max": 0.18789852661499487, "rho": 0.6079146855055482}
    trial = SimpleNamespace(trial_id="69d00_00000", config=cfg, last_result=None)
    cb.on_trial_start(0, [trial], trial)
    trial.last_result = {"val_loss": 4.97959, "training_iteration": 11, "time_total_s": 39.9,
                         "trial_finished": 1.0}
    cb.on_trial_complete(1, [trial], trial)
    stopped = SimpleNamespace(trial_id="69d00_00001", config=cfg,
                              last_result={"val_loss": 5.5281, "training_iteration": 2,
                                           "time_total_s": 31.2})
    cb.on_trial_complete(2, [stopped], stopped)
    broken = SimpleNamespace(trial_id="69d00_00002", config=cfg, last_result=None)
    cb.on_trial_error(3, [broken], broken)
    lines = capsys.readouterr().out.splitlines()
    clock = r"\[lethe\] \d\d:\d\d:\d\d stage trial       "
    assert len(lines) == 4
    assert re.fullmatch(clock + r"69d00_00000  started\s+lambda_max=0\.1879 rho=0\.6079", lines[0]), lines[0]
    assert re.fullmatch(clock + r"69d00_00000  done\s+39\.9 s  val_loss=4\.9796 iterations=11 "
                        r"lambda_max=0\.1879 rho=0\.6079", lines[1]), lines[1]
    assert " stopped " in lines[2] and "val_loss=5.5281 iterations=2" in lines[2]
    assert " failed " in lines[3] and "val_loss=- iterations=0" in lines[3]
