"""The effect study: paired differences over seeds with a Student-t interval, the comparison
report built on them (config order, headline), and noise detection per noise kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_partition_stage import _write as write_partition_inputs

from orchestrator.config import DataConfig, PartitionConfig
from orchestrator.partition import run_partition
from orchestrator.partition.stage import noise_kind_stats
from orchestrator.tracking.compare import CompareOrder, effects, report_text, summarise
from orchestrator.tracking.effect import paired_effect, t_critical

SEEDS = ["1", "2", "3"]


# ------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("dof, table_value", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776),
                                              (9, 2.262), (29, 2.045), (120, 1.980)])
def test_t_critical_matches_the_t_table(dof, table_value):
    assert t_critical(dof) == pytest.approx(table_value, abs=1e-3)


def test_planted_effect_is_flagged():
    sft = {"1": 0.38, "2": 0.49, "3": 0.43}  # the seeds move both methods alike
    forget = {s: v + 0.05 + d for (s, v), d in zip(sft.items(), (0.004, -0.003, 0.001), strict=True)}
    eff = paired_effect(forget, sft, a="forget", b="sft")
    assert eff.n == 3 and eff.mean == pytest.approx(0.05 + 0.002 / 3)
    assert eff.significant and eff.lo > 0
    # the interval is mean ± t(2) · sd / sqrt(3)
    d = np.array([forget[s] - sft[s] for s in SEEDS])
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)
    assert (eff.lo, eff.hi) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-6)
    assert "forget is better than sft beyond the seed noise" in eff.verdict
    assert "95% Student-t" in eff.verdict
    # the seed spread (0.055) exceeds the effect: pairing over seeds is what finds it
    assert np.std(list(sft.values()), ddof=1) > 0.05


def test_differences_of_random_sign_are_not_flagged():
    sft = {"1": 0.40, "2": 0.47, "3": 0.43}
    forget = {"1": 0.43, "2": 0.45, "3": 0.44}  # +0.03, -0.02, +0.01
    eff = paired_effect(forget, sft)
    assert not eff.significant and eff.lo < 0 < eff.hi
    assert eff.verdict.startswith("within the seed noise")


def test_false_alarm_rate_on_pure_noise_is_near_five_percent():
    rng = np.random.default_rng(0)
    flagged = 0
    trials = 2000
    for _ in range(trials):
        base = rng.normal(0.5, 0.05, 3)
        a = dict(zip(SEEDS, base + rng.normal(0, 0.01, 3), strict=True))
        b = dict(zip(SEEDS, base + rng.normal(0, 0.01, 3), strict=True))
        flagged += paired_effect(a, b).significant
    assert 0.03 < flagged / trials < 0.07


def test_one_seed_has_no_interval_and_unpaired_seeds_are_dropped():
    eff = paired_effect({"1": 0.6}, {"1": 0.5})
    assert eff.n == 1 and eff.lo is None and not eff.significant
    assert eff.verdict.startswith("one seed: no interval")
    assert eff.cell() == "+0.100 (1 seed)"
    eff = paired_effect({"1": 0.6, "2": 0.7, "3": float("nan")}, {"1": 0.5, "2": 0.6, "4": 0.1})
    assert eff.n == 2 and eff.seeds == ["1", "2"]
    assert paired_effect({"1": 0.6}, {"2": 0.5}).mean is None


# ------------------------------------------------------------------------ the report


def scripted_runs() -> pd.DataFrame:
    """Per-seed results of two families: 'planted' has forget − sft ≈ +0.05 on mc/acc with
    small noise; 'noise' has differences of random sign."""
    rng = np.random.default_rng(3)
    rows = []
    seed_effect = {"1": 0.0, "2": 0.06, "3": -0.04}
    for fam, gain in (("planted", 0.05), ("noise", 0.0)):
        rows.append({"family": fam, "method": "base", "seed": "-", "mc/acc": 0.25,
                     "mc/acc_norm": 0.25, "gen/exact_match": 0.0})
        for method in ("sft", "ignore", "forget"):
            for seed in SEEDS:
                shift = gain if method == "forget" else 0.0
                rows.append({"family": fam, "method": method, "seed": seed,
                             "mc/acc": 0.5 + seed_effect[seed] + shift + rng.normal(0, 0.004),
                             "mc/acc_norm": 0.5 + seed_effect[seed] + rng.normal(0, 0.02),
                             "gen/exact_match": 0.1 + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


ORDER = CompareOrder(families=["planted", "noise"], methods=["base", "sft", "ignore", "forget"],
                     tasks=["mc", "gen"])


def test_report_flags_the_planted_family_only():
    records = effects(scripted_runs(), ORDER)
    by = {(r["family"], r["effect"].b, r["metric"]): r["effect"] for r in records}
    assert by[("planted", "sft", "mc/acc")].significant
    assert by[("planted", "ignore", "mc/acc")].significant
    assert not by[("noise", "sft", "mc/acc")].significant
    text = report_text(scripted_runs(), pd.DataFrame(), ORDER)
    assert "95% Student-t CI" in text
    assert "planted  forget − sft (3 paired seeds): better beyond the seed noise on mc/acc" in text
    assert "noise  forget − sft (3 paired seeds): within the seed noise on mc/acc" in text


def test_tables_follow_config_order_whatever_the_input_order():
    runs = scripted_runs()
    shuffled = runs.sample(frac=1.0, random_state=1)[["seed", "gen/exact_match", "method",
                                                       "mc/acc_norm", "family", "mc/acc"]]
    table = summarise(shuffled, ORDER)[0]
    assert list(table.columns) == ["seeds", "mc/acc", "mc/acc_norm", "gen/exact_match"]
    assert list(table.index) == [(f, m) for f in ("planted", "noise")
                                 for m in ("base", "sft", "ignore", "forget")]
    assert report_text(shuffled, pd.DataFrame(), ORDER) == report_text(runs, pd.DataFrame(), ORDER)
    other = CompareOrder(families=["noise", "planted"], methods=["base", "forget", "sft", "ignore"],
                         tasks=["gen", "mc"])
    table = summarise(runs, other)[0]
    assert list(table.columns) == ["seeds", "gen/exact_match", "mc/acc", "mc/acc_norm"]
    assert table.index[0] == ("noise", "base") and table.index[1] == ("noise", "forget")


def test_one_seed_report_says_no_interval():
    runs = scripted_runs()
    runs = runs[runs["seed"].isin(["-", "1"])]
    text = report_text(runs, pd.DataFrame(), ORDER)
    assert "one seed: no interval" in text and "(1 seed)" in text and "] *" not in text


# ------------------------------------------------------------------------ noise kinds


def test_noise_kind_auroc_and_recall_on_a_tiny_example():
    # 8 tokens: 4 clean, 2 typo (clearly low scores), 2 wrong_value (mixed in with clean)
    scores = np.array([0.9, 0.8, 0.7, 0.6, -1.0, -0.9, 0.75, 0.1], dtype=np.float32)
    noise = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.int8)
    kinds = np.array([-1, -1, -1, -1, 1, 1, 0, 0], dtype=np.int8)  # names[0] = wrong_value
    classes = np.where(scores < 0.65, -1, 1).astype(np.int8)  # negatives: -1.0, -0.9, 0.1, 0.6
    stats = noise_kind_stats(scores, classes, noise, kinds, ["wrong_value", "typo"])
    assert stats["typo"] == {"n_noise": 2, "recall": 1.0, "auroc": 1.0}
    # wrong_value vs clean: -0.75 beats the clean -0.9, -0.8 (2 of 4 pairs), -0.1 beats all 4
    assert stats["wrong_value"]["n_noise"] == 2
    assert stats["wrong_value"]["recall"] == 0.5
    assert stats["wrong_value"]["auroc"] == pytest.approx((2 + 4) / 8)


def _kind_corpus(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    kinds = [None, "typo", "filler", None, "wrong_value", "typo", None, "filler"] * 3
    rows = []
    for i, kind in enumerate(kinds):
        n = 12
        mask = np.r_[np.zeros(3, np.int8), np.ones(n - 3, np.int8)]
        noise = np.zeros(n, np.int8)
        if kind:
            noise[5:8] = 1
        base = rng.normal(2.0, 0.3, n).astype(np.float32)
        # typos are learned least by the reference (lowest score), fillers a little
        drop = {"typo": -1.0, "filler": 0.75, "wrong_value": 0.95}.get(kind, 1.0)
        ref = (base - np.where(noise == 1, drop, 1.0) + rng.normal(0, 0.2, n)).astype(np.float32)
        base[mask == 0] = np.nan
        ref[mask == 0] = np.nan
        rows.append({"sample_id": i, "input_ids": np.arange(n, dtype=np.int32),
                     "response_mask": mask, "noise_mask": noise, "noise_kind": kind,
                     "base_loss": base, "ref_loss": ref})
    return write_partition_inputs(rows, root, score_files=1)


def test_partition_report_has_noise_by_kind(tmp_path):
    tokens, scores = _kind_corpus(tmp_path)
    report = run_partition(tokens, scores, PartitionConfig(rho=0.7), tmp_path / "part")
    by_kind = report["noise_by_kind"]
    assert list(by_kind) == ["filler", "typo", "wrong_value"]
    assert by_kind["typo"]["n_noise"] == 6 * 3 and by_kind["wrong_value"]["n_noise"] == 3 * 3
    # the separation planted above, in order
    assert by_kind["typo"]["auroc"] > by_kind["filler"]["auroc"] > by_kind["wrong_value"]["auroc"]
    assert by_kind["typo"]["recall"] == 1.0
    saved = json.loads((tmp_path / "part" / "report.json").read_text())
    assert saved["noise_by_kind"] == by_kind


# The distributed path's noise_by_kind equals the in-memory one: tests/test_partition_stage.py
# (test_distributed_path_equals_in_memory, on a corpus with noise kinds).


def test_prepare_writes_a_per_sample_noise_kind(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from lethe_tiny_tokenizers import build_tokenizer

    from orchestrator.data import prepare_dataset, read_tokens

    rows = [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                      {"role": "assistant", "content": "The answer is 5."}],
         "noise_kind": "wrong_value", "noise_spans": [{"message": 1, "start": 14, "end": 15}]},
        {"messages": [{"role": "user", "content": "What is 3 + 3?"},
                      {"role": "assistant", "content": "The answer is 6."}],
         "noise_kind": None, "noise_spans": []},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare_dataset(DataConfig(source="file", path=str(src)), build_tokenizer(),
                             tmp_path / "out")
    table = read_tokens(report.tokens_path).to_pydict()
    assert table["noise_kind"] == ["wrong_value", None]
    assert sum(table["noise_mask"][0]) > 0 and sum(table["noise_mask"][1]) == 0
