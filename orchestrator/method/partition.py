"""Token partition by score: the top `rho` fraction of tokens are positive, the rest negative.

The paper's partition (Taheri et al., TMLR 2026, arXiv 2508.04329): one threshold over the
scores CE_base - CE_ref (method/score.py) of all response tokens of the corpus, chosen so
that a fraction rho of them (0.7 in the paper) score above it: those are positive, learned;
the rest negative, forgotten. `partition_per_sample` (a threshold per sample) is a variant,
not the paper's.

A ragged corpus is three flat arrays: `scores` (float, one per *response* token, in corpus
order), `offsets` (int64 [S+1]; sample s owns scores[offsets[s]:offsets[s+1]]) and
`sample_ids` (int64 [S]). The caller drops non-response positions before calling.

The global threshold is found by selection (np.partition, O(N)), never by sorting the
corpus. Ties at the threshold are broken by flat corpus order: the earlier token wins a
positive slot, so the result is deterministic and has exactly `positive_count(N, rho)`
positives. Pure numpy (method core).
"""

from __future__ import annotations

import math

import numpy as np

POSITIVE = np.int8(1)
NEGATIVE = np.int8(-1)
_TIE_BLOCK = 1 << 20  # tokens scanned per step when handing out positive slots to ties


def positive_count(n: int, rho: float) -> int:
    """floor(n * rho), except that a product within 1e-6 of an integer counts as it.

    Without the guard float rounding would give 100 * 0.29 = 28.999999999999996 -> 28.
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and 0.0 <= rho <= 1.0):
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    product = n * float(rho)
    nearest = round(product)
    return int(nearest) if abs(product - nearest) < 1e-6 else math.floor(product)


def _as_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(
            f"scores must be a 1-D float array, got shape {scores.shape} dtype {scores.dtype}"
        )
    return scores


def _require_finite(scores: np.ndarray) -> None:
    # A float64 sum of float32 values cannot overflow, so it is finite iff every value is;
    # this avoids an N-byte mask on the common path. float64 input falls back to isfinite.
    if scores.dtype.itemsize <= 4 and np.isfinite(scores.sum(dtype=np.float64)):
        return
    bad = ~np.isfinite(scores)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"score at flat index {i} is {scores[i]}; run check_finite(scores, offsets, "
            "sample_ids) to find the sample"
        )


def _threshold(scores: np.ndarray, k: int) -> tuple[float, int]:
    n = scores.size
    if n == 0:
        return 0.0, 0
    if k == 0:
        # Nothing is > max, and no tie gets a slot: all negative.
        return float(scores.max()), 0
    kth = n - k  # ascending position of the k-th largest value
    t = np.partition(scores, kth)[kth]
    n_greater = int(np.count_nonzero(scores > t))
    return float(t), k - n_greater


def global_threshold(scores: np.ndarray, rho: float) -> tuple[float, int]:
    """(t, k_ties): positive = score > t, plus the first k_ties tokens with score == t.

    Exactly positive_count(N, rho) positives; O(N). Non-finite scores raise ValueError.
    """
    scores = _as_scores(scores)
    k = positive_count(scores.size, rho)
    _require_finite(scores)
    return _threshold(scores, k)


def _classes_from_threshold(scores: np.ndarray, t: float, k_ties: int) -> np.ndarray:
    above = scores > scores.dtype.type(t)
    classes = above.view(np.int8) * np.int8(2)  # 1 -> 2, 0 -> 0, no int64 temporary
    classes -= np.int8(1)
    remaining = k_ties
    start = 0
    while remaining > 0 and start < scores.size:
        stop = min(start + _TIE_BLOCK, scores.size)
        ties = np.flatnonzero(scores[start:stop] == scores.dtype.type(t))[:remaining]
        classes[start + ties] = POSITIVE
        remaining -= ties.size
        start = stop
    if remaining:
        raise AssertionError(f"{remaining} tie slots left unassigned at threshold {t}")
    return classes


def partition_global(scores: np.ndarray, rho: float) -> np.ndarray:
    """int8 [N]: +1 for the top positive_count(N, rho) scores of the corpus, else -1."""
    scores = _as_scores(scores)
    t, k_ties = global_threshold(scores, rho)
    return _classes_from_threshold(scores, t, k_ties)


def _check_offsets(offsets: np.ndarray, n: int) -> np.ndarray:
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size == 0 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be a non-empty 1-D int array [S+1], got {offsets.shape} "
                         f"{offsets.dtype}")
    if offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(f"offsets must start at 0 and end at len(scores) = {n}, got "
                         f"{offsets[0]} .. {offsets[-1]}")
    steps = np.diff(offsets)
    if (steps < 0).any():
        s = int(np.argmax(steps < 0))
        raise ValueError(f"offsets decrease at sample index {s}: {offsets[s]} -> {offsets[s + 1]}")
    return offsets


def partition_per_sample(scores: np.ndarray, offsets: np.ndarray, rho: float) -> np.ndarray:
    """int8 [N]: within each sample, its top positive_count(n_s, rho) scores are +1."""
    scores = _as_scores(scores)
    offsets = _check_offsets(offsets, scores.size)
    positive_count(0, rho)  # validates rho even for an empty corpus
    _require_finite(scores)
    classes = np.full(scores.size, NEGATIVE, dtype=np.int8)
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        if b > a:
            seg = scores[a:b]
            t, k_ties = _threshold(seg, positive_count(b - a, rho))
            classes[a:b] = _classes_from_threshold(seg, t, k_ties)
    return classes


def check_finite(scores: np.ndarray, offsets: np.ndarray, sample_ids: np.ndarray) -> None:
    """ValueError naming the sample_id (and token position) of the first NaN/inf score."""
    scores = _as_scores(scores)
    offsets = _check_offsets(offsets, scores.size)
    sample_ids = np.asarray(sample_ids)
    if sample_ids.shape != (offsets.size - 1,):
        raise ValueError(f"sample_ids must have {offsets.size - 1} entries (len(offsets) - 1), "
                         f"got shape {sample_ids.shape}")
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    s = int(np.searchsorted(offsets, i, side="right")) - 1
    raise ValueError(
        f"non-finite score {scores[i]} in sample_id {int(sample_ids[s])} at response token "
        f"{i - int(offsets[s])} (flat index {i})"
    )


def auroc(detector: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `detector` for boolean `labels` (rank-based, ties averaged).

    None when one class is absent (the AUROC is undefined).
    """
    x = np.asarray(detector)
    y = np.asarray(labels).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.concatenate(([0], np.flatnonzero(xs[1:] != xs[:-1]) + 1))
    ends = np.concatenate((starts[1:], [xs.size]))
    # Tied values share the mean of the 1-based ranks start+1 .. end.
    mean_rank = (starts + ends + 1) / 2.0
    positives_per_group = np.add.reduceat(y[order].astype(np.int64), starts)
    rank_sum = float(np.dot(positives_per_group, mean_rank))
    return (rank_sum - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def partition_stats(
    scores: np.ndarray,
    classes: np.ndarray,
    noise_mask: np.ndarray | None = None,
    bins: int = 100,
) -> dict:
    """JSON-ready summary of a partition: counts, threshold, per-class histogram and,
    with a ground-truth noise mask, how well the negative set finds the noise.

    threshold: the lowest positive score (the max score when nothing is positive, 0.0 for
    an empty corpus). precision / recall / f1 treat "negative" as the prediction "noise";
    undefined ratios are 0.0. auroc is for -score as a noise detector (None if undefined).
    """
    scores = _as_scores(scores)
    classes = np.asarray(classes)
    if classes.shape != scores.shape:
        raise ValueError(f"classes shape {classes.shape} != scores shape {scores.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    pos = classes == 1
    neg = classes == -1
    n = int(scores.size)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos:
        threshold = float(scores[pos].min())
    else:
        threshold = float(scores.max()) if n else 0.0
    lo, hi = (float(scores.min()), float(scores.max())) if n else (0.0, 0.0)
    edges = np.histogram_bin_edges(scores, bins=bins, range=(lo, hi))
    stats: dict = {
        "n_tokens": n,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "n_untrained": n - n_pos - n_neg,
        "positive_fraction": n_pos / n if n else 0.0,
        "threshold": threshold,
        "score_mean_positive": float(scores[pos].mean()) if n_pos else 0.0,
        "score_mean_negative": float(scores[neg].mean()) if n_neg else 0.0,
        "histogram": {
            "edges": edges.tolist(),
            "positive": np.histogram(scores[pos], bins=edges)[0].tolist(),
            "negative": np.histogram(scores[neg], bins=edges)[0].tolist(),
        },
    }
    if noise_mask is None:
        return stats
    noise = np.asarray(noise_mask)
    if noise.shape != scores.shape:
        raise ValueError(f"noise_mask shape {noise.shape} != scores shape {scores.shape}")
    noise = noise.astype(bool)
    n_noise = int(noise.sum())
    caught = int(np.count_nonzero(neg & noise))
    precision = caught / n_neg if n_neg else 0.0
    recall = caught / n_noise if n_noise else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    stats.update(
        n_noise=n_noise,
        noise_fraction=n_noise / n if n else 0.0,
        auroc=auroc(-scores.astype(np.float64), noise),
        precision=precision,
        recall=recall,
        f1=f1,
    )
    return stats
