"""Partition: selection vs a brute-force sort, tie-breaking, per-sample, stats, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.method.partition import (
    auroc,
    check_finite,
    global_threshold,
    partition_global,
    partition_per_sample,
    partition_stats,
    positive_count,
)

RHOS = [0.0, 0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.77, 0.9, 0.999, 1.0]


def brute_force(scores: np.ndarray, rho: float) -> np.ndarray:
    """Full sort by (-score, flat index): the top floor(N * rho) are positive."""
    k = positive_count(scores.size, rho)
    order = sorted(range(scores.size), key=lambda i: (-float(scores[i]), i))
    out = np.full(scores.size, -1, dtype=np.int8)
    out[order[:k]] = 1
    return out


def _score_sets():
    rng = np.random.default_rng(0)
    yield rng.normal(size=1001).astype(np.float32)
    # Heavy ties: only 5 distinct values.
    yield rng.integers(0, 5, size=997).astype(np.float32)
    # Everything equal.
    yield np.full(300, 0.5, dtype=np.float32)
    # Ties plus float64 input.
    yield np.round(rng.normal(size=500), 1)


@pytest.mark.parametrize("rho", RHOS)
def test_global_matches_brute_force(rho):
    for scores in _score_sets():
        got = partition_global(scores, rho)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, brute_force(scores, rho))
        assert int((got == 1).sum()) == int(np.floor(scores.size * rho + 1e-9))


def test_threshold_and_tie_count_hand_example():
    scores = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 2.0, 0.0], dtype=np.float32)
    # rho 4/7: 5, 3 strictly above 2; two of the three 2s (the earliest) get slots.
    t, k_ties = global_threshold(scores, 4 / 7)
    assert (t, k_ties) == (2.0, 2)
    assert partition_global(scores, 4 / 7).tolist() == [1, -1, 1, 1, 1, -1, -1]
    assert global_threshold(scores, 0.0) == (5.0, 0)
    assert global_threshold(scores, 1.0) == (0.0, 1)


def test_rho_edges_and_empty():
    scores = np.array([0.3, -1.0, 2.0], dtype=np.float32)
    assert partition_global(scores, 0.0).tolist() == [-1, -1, -1]
    assert partition_global(scores, 1.0).tolist() == [1, 1, 1]
    empty = np.array([], dtype=np.float32)
    assert global_threshold(empty, 0.7) == (0.0, 0)
    out = partition_global(empty, 0.7)
    assert out.dtype == np.int8 and out.size == 0
    assert partition_per_sample(empty, np.array([0]), 0.7).size == 0


def test_positive_count_guards_float_rounding():
    assert 100 * 0.29 < 29  # the float product really is below 29
    assert positive_count(100, 0.29) == 29
    assert positive_count(10, 0.7) == 7
    assert positive_count(7, 0.5) == 3
    assert positive_count(0, 0.5) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rho must be in"):
            positive_count(10, bad)


def test_per_sample_matches_brute_force_per_segment():
    rng = np.random.default_rng(1)
    lengths = [0, 1, 2, 7, 10, 33, 0, 5]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    scores = rng.integers(0, 4, size=offsets[-1]).astype(np.float32)  # many ties
    for rho in (0.0, 0.3, 0.5, 0.7, 1.0):
        got = partition_per_sample(scores, offsets, rho)
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            np.testing.assert_array_equal(got[a:b], brute_force(scores[a:b], rho))
    # Per-sample differs from global when samples have different score levels.
    scores2 = np.array([9.0, 8.0, 1.0, 0.0], dtype=np.float32)
    offs2 = np.array([0, 2, 4])
    assert partition_per_sample(scores2, offs2, 0.5).tolist() == [1, -1, 1, -1]
    assert partition_global(scores2, 0.5).tolist() == [1, 1, -1, -1]


def test_bad_offsets():
    scores = np.zeros(5, dtype=np.float32)
    with pytest.raises(ValueError, match="end at len"):
        partition_per_sample(scores, np.array([0, 3]), 0.5)
    with pytest.raises(ValueError, match="decrease at sample index 1"):
        partition_per_sample(scores, np.array([0, 3, 2, 5]), 0.5)


def test_check_finite_names_sample_id():
    scores = np.array([0.1, 0.2, 0.3, np.nan, 0.5, np.inf], dtype=np.float32)
    offsets = np.array([0, 2, 2, 5, 6])
    sample_ids = np.array([10, 11, 12, 13])
    with pytest.raises(ValueError, match="sample_id 12 at response token 1"):
        check_finite(scores, offsets, sample_ids)
    check_finite(scores[:3], np.array([0, 2, 3]), np.array([4, 5]))  # fine: no error
    with pytest.raises(ValueError, match="sample_ids must have 4 entries"):
        check_finite(scores, offsets, sample_ids[:3])
    with pytest.raises(ValueError, match="check_finite"):
        partition_global(scores, 0.5)
    with pytest.raises(ValueError, match="flat index 3"):
        partition_global(scores.astype(np.float64), 0.5)


def test_stats_hand_example():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=np.float32)
    classes = partition_global(scores, 0.5)
    noise = np.array([0, 0, 0, 1, 1, 1])
    st = partition_stats(scores, classes, noise, bins=5)
    assert st["n_tokens"] == 6 and st["n_positive"] == 3 and st["n_negative"] == 3
    assert st["threshold"] == 3.0 and st["positive_fraction"] == 0.5
    assert st["score_mean_positive"] == 4.0 and st["score_mean_negative"] == 1.0
    assert st["histogram"]["edges"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert st["histogram"]["positive"] == [0, 0, 0, 1, 2]
    assert st["histogram"]["negative"] == [1, 1, 1, 0, 0]
    assert st["auroc"] == 1.0  # low scores are exactly the noise
    assert (st["precision"], st["recall"], st["f1"]) == (1.0, 1.0, 1.0)
    # Inverted noise: AUROC 0, nothing caught.
    st = partition_stats(scores, classes, 1 - noise)
    assert st["auroc"] == 0.0 and (st["precision"], st["recall"], st["f1"]) == (0.0, 0.0, 0.0)
    # Partly right: negatives {3,4,5}, noise {2,3}: precision 1/3, recall 1/2.
    st = partition_stats(scores, classes, np.array([0, 0, 1, 1, 0, 0]))
    assert st["precision"] == pytest.approx(1 / 3) and st["recall"] == pytest.approx(0.5)
    assert st["f1"] == pytest.approx(0.4)


def test_auroc_ties_averaged_and_random():
    # Brute force: P(x_noise > x_clean) + 0.5 P(equal).
    x = np.array([1, 2, 2, 3, 3, 3, 0], dtype=np.float64)
    y = np.array([0, 1, 0, 1, 0, 1, 0], dtype=bool)
    pairs = [(a, b) for a in x[y] for b in x[~y]]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auroc(x, y) == pytest.approx(expected)
    rng = np.random.default_rng(2)
    r = auroc(rng.normal(size=20000), rng.random(20000) < 0.3)
    assert 0.47 < r < 0.53
    assert auroc(x, np.zeros(7, dtype=bool)) is None


def test_stats_empty_and_all_negative():
    empty = np.array([], dtype=np.float32)
    st = partition_stats(empty, np.array([], dtype=np.int8), np.array([], dtype=np.int8))
    assert st["n_tokens"] == 0 and st["n_positive"] == 0 and st["n_negative"] == 0
    assert st["threshold"] == 0.0 and st["positive_fraction"] == 0.0
    assert sum(st["histogram"]["positive"]) == 0 and st["precision"] == 0.0
    assert st["auroc"] is None
    scores = np.array([1.0, 2.0], dtype=np.float32)
    st = partition_stats(scores, partition_global(scores, 0.0))
    assert st["n_negative"] == 2 and st["threshold"] == 2.0 and "auroc" not in st
    with pytest.raises(ValueError, match="classes shape"):
        partition_stats(scores, np.array([1]))


def test_random_sizes_and_rhos_match_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(1, 400))
        levels = int(rng.integers(1, 12))
        scores = (rng.integers(0, levels, size=n) * 0.25).astype(np.float32)
        rho = float(rng.random())
        np.testing.assert_array_equal(partition_global(scores, rho), brute_force(scores, rho))
