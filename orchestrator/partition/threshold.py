"""Exact global threshold in two data passes, for corpora too large to gather on one host.

Pass 1 histograms the scores by the top 16 bits of an order-preserving uint32 key of each
float32 score (65536 bins, no min/max pass needed) and finds the bin holding the k-th
largest score. Pass 2 collects only the scores of that bin with their (sample_id, position),
which gives the exact threshold t and, among the tokens equal to t, the last one (in flat
corpus order) that still gets a positive slot. The classification is then

    positive  <=>  score > t  or  (score == t and (sample_id, position) <= tie_cutoff)

which is exactly `orchestrator.method.partition.partition_global` (same k, same t, same
k_ties, earlier tokens win ties). The per-batch functions are plain numpy; `stage.py` runs
them as Ray Data map passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.method.partition import positive_count

NUM_BINS = 1 << 16


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys with key(a) < key(b) <=> a < b for finite float32 (and -0.0 == +0.0)."""
    # Adding +0.0 turns -0.0 into +0.0, so the two zeros (equal as floats) share one key.
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def histogram_partial(scores: np.ndarray) -> dict[str, np.ndarray]:
    """One batch's contribution to pass 1: sparse bin counts, token count and max score."""
    bins, counts = np.unique(sortable_keys(scores) >> np.uint32(16), return_counts=True)
    return {
        "bins": bins.astype(np.int64),
        "counts": counts.astype(np.int64),
        "n": np.int64(scores.size),
        "max": np.float32(scores.max()) if scores.size else np.float32(-np.inf),
    }


@dataclass(frozen=True)
class Bracket:
    """What pass 1 learned: k, the bin of the k-th largest score and how many lie above it."""

    n: int
    k: int
    bin: int  # -1 when no pass 2 is needed (k == 0 or empty corpus)
    above: int  # scores in bins above `bin`
    max_score: float


def bracket_from_histogram(partials: list[dict], rho: float) -> Bracket:
    hist = np.zeros(NUM_BINS, dtype=np.int64)
    n, max_score = 0, -np.inf
    for p in partials:
        np.add.at(hist, np.asarray(p["bins"], dtype=np.int64), np.asarray(p["counts"], dtype=np.int64))
        n += int(p["n"])
        max_score = max(max_score, float(p["max"]))
    k = positive_count(n, rho)
    if k == 0:
        return Bracket(n, 0, -1, 0, max_score if n else 0.0)
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first bin (from the top) reaching k
    b = NUM_BINS - 1 - idx
    return Bracket(n, k, b, int(from_top[idx] - hist[b]), max_score)


def bracket_members(scores: np.ndarray, sample_ids: np.ndarray, positions: np.ndarray,
                    bin_index: int) -> dict[str, np.ndarray]:
    """Pass 2 for one batch: the scores in the bracket bin and where they are."""
    inside = (sortable_keys(scores) >> np.uint32(16)) == np.uint32(bin_index)
    return {"score": scores[inside].astype(np.float32), "sample_id": sample_ids[inside],
            "position": positions[inside]}


@dataclass(frozen=True)
class GlobalCut:
    """The exact global partition rule (see module docstring)."""

    threshold: float
    k_ties: int
    tie_cutoff: tuple[int, int] | None  # (sample_id, position) of the last positive tie

    def classify(self, scores: np.ndarray, sample_ids: np.ndarray,
                 positions: np.ndarray) -> np.ndarray:
        t = np.float32(self.threshold)
        positive = scores > t
        if self.tie_cutoff is not None:
            sid, pos = self.tie_cutoff
            earlier = (sample_ids < sid) | ((sample_ids == sid) & (positions <= pos))
            positive |= (scores == t) & earlier
        return np.where(positive, np.int8(1), np.int8(-1)).astype(np.int8)


def cut_from_bracket(bracket: Bracket, members: list[dict]) -> GlobalCut:
    """t = the k-th largest score; the first k_ties tokens equal to t (corpus order) are positive."""
    if bracket.k == 0:
        return GlobalCut(bracket.max_score, 0, None)
    score = np.concatenate([m["score"] for m in members]).astype(np.float32)
    sid = np.concatenate([m["sample_id"] for m in members]).astype(np.int64)
    pos = np.concatenate([m["position"] for m in members]).astype(np.int64)
    need = bracket.k - bracket.above  # positive slots inside the bin, >= 1
    if not 1 <= need <= score.size:
        raise RuntimeError(f"bracket bin {bracket.bin} holds {score.size} scores, but {need} "
                           "positive slots fall in it: the two passes saw different data")
    order = np.lexsort((pos, sid, -score.astype(np.float64)))  # score desc, then corpus order
    t = score[order[need - 1]]
    k_ties = need - int(np.count_nonzero(score > t))
    ties = order[score[order] == t][:k_ties]
    last = ties[-1]
    return GlobalCut(float(t), k_ties, (int(sid[last]), int(pos[last])))
