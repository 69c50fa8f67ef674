"""The effect-study helpers behind docs/effect-study.md: the tables printed from a study result
(scripts/study_tables.py) and the reuse of an earlier result's sft runs
(scripts/paper_regime_study.py --sft-from), on a hand-made result."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def _result() -> dict:
    def ev(mc: float, gen: float) -> dict:
        return {"eval": {"mc_acc": mc, "gen_em": gen}}

    trainings = [{"method": m, "seed": s, "steps": 10, "sum_lr": 0.11, "wall_s": 100.0 + s,
                  "final_pos_loss": 0.5, "final_neg_loss": None if m == "sft" else 3.0,
                  "eval": ev(mc, 0.1)}
                 for m, mcs in (("sft", (0.5, 0.6, 0.7)), ("forget", (0.4, 0.6, 0.5)))
                 for s, mc in enumerate(mcs)]
    return {"config": "configs/x.yaml", "overrides": ["train.lr=2e-2", "partition.rho=0.7"],
            "base": ev(0.3, 0.0), "trainings": trainings}


def test_method_table_gives_mean_and_range_per_method():
    tables = _load("study_tables")
    text = tables.method_table(_result(), "eval")
    assert "| base | 1 | 0.300 | 0.000 |" in text
    assert "| sft | 3 | 0.600 (0.500–0.700) | 0.100 (0.100–0.100) |" in text
    assert "| forget | 3 | 0.500 (0.400–0.600) |" in text


def test_pair_table_prints_ci_half_width_and_mde():
    tables = _load("study_tables")
    res = _result()
    res["summary"] = {"eval": {"pairs": [{"pair": "forget - sft", "metric": "mc_acc", "n": 3,
                                          "mean": -0.1, "lo": -0.35, "hi": 0.15,
                                          "significant": False, "half_width": 0.25, "mde": 0.31}]}}
    assert "| forget - sft | mc_acc | 3 | -0.100 | [-0.350, +0.150] | 0.250 | 0.310 |" in \
        tables.pair_table(res, "eval")


def test_sft_runs_are_reused_only_from_the_same_config_and_data(tmp_path):
    study = _load("paper_regime_study")
    path = tmp_path / "paper.json"
    path.write_text(json.dumps(_result()))
    # rho, lambda and the negative term do not change an sft run: accepted
    runs = study.earlier_sft(path, "configs/x.yaml",
                             ["train.lr=2e-2", "partition.rho=0.9", "train.lambda.t_max=0.1",
                              "train.negative_term=unlikelihood"])
    assert [(t["method"], t["seed"]) for t in runs] == [("sft", 0), ("sft", 1), ("sft", 2)]
    # a different learning rate is a different sft run: refused, naming both
    with pytest.raises(SystemExit, match=r"train.lr=2e-2.*train.lr=1e-3"):
        study.earlier_sft(path, "configs/x.yaml", ["train.lr=1e-3"])
    with pytest.raises(SystemExit, match="configs/y.yaml"):
        study.earlier_sft(path, "configs/y.yaml", ["train.lr=2e-2"])
