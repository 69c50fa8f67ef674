"""Global partition: Lethe's O(N) selection vs the paper's global Python sort.

Lethe: `partition_global` on a flat float32 array (np.partition for the k-th value).
Paper's way: a Python list of (score, sample, position) tuples sorted globally. Sorting 100M
tuples needs ~15 GB and minutes, so it is measured on a subsample (default 1.5M tokens) and
extrapolated as n log n (time) and linearly (memory); the output says so on each such row.

    .venv/bin/python benchmarks/partition_bench.py [--sizes 10M,100M] [--paper-sample 1.5M]

Last line: `ratio lethe/paper partition_speedup <x>` (at the largest size).
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.method.partition import partition_global, positive_count  # noqa: E402


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * scale)


def synthetic_corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Continuous float32 scores and sample offsets (~300 tokens per sample)."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(n, dtype=np.float32)
    lengths = rng.integers(20, 580, size=n // 300 + 2)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    offsets = offsets[offsets < n]
    return scores, np.append(offsets, n)


def paper_partition(scores: np.ndarray, offsets: np.ndarray, rho: float) -> tuple[float, float]:
    """The paper's way; returns (seconds to build the tuple list, seconds to sort it).

    Only the build and the sort are timed (the work needed just to know the order); the
    paper then also turns the top-k into index sets, which is left out in its favour.
    """
    t0 = time.perf_counter()
    tokens = []
    for s in range(offsets.size - 1):
        seg = scores[offsets[s]:offsets[s + 1]].tolist()
        tokens.extend((v, s, p) for p, v in enumerate(seg))
    t1 = time.perf_counter()
    tokens.sort(key=lambda x: x[0], reverse=True)
    t2 = time.perf_counter()
    k = positive_count(len(tokens), rho)
    assert k == 0 or tokens[k - 1][0] >= tokens[-1][0]
    return t1 - t0, t2 - t1


def traced_peak(fn, *args) -> int:
    """Peak bytes allocated while fn runs, from tracemalloc (numpy buffers are traced too)."""
    gc.collect()
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def nlogn_scale(n: int, m: int) -> float:
    return (n * math.log(n)) / (m * math.log(m))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,100M", help="comma list, e.g. 1M,10M,100M")
    ap.add_argument("--paper-sample", default="1.5M", help="tokens for the measured Python sort")
    ap.add_argument("--rho", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=2, help="best-of for the Lethe timing")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    m = parse_size(args.paper_sample)

    avail = psutil.virtual_memory().available
    need = max(sizes) * 4 * 3.5  # scores + partition copy + mask + classes, with slack
    if need > avail:
        sys.exit(f"largest size needs ~{need / 2**30:.1f} GiB, only {avail / 2**30:.1f} available")

    print(f"# paper's way measured on {m:,} tokens; larger sizes EXTRAPOLATED (time n log n, "
          "memory linear). Memory = peak bytes allocated during the call (tracemalloc, "
          "untimed separate pass), input scores excluded.")
    scores_m, offsets_m = synthetic_corpus(m, seed=1)
    build_s, sort_s = paper_partition(scores_m, offsets_m, args.rho)
    paper_bytes_per_token = traced_peak(paper_partition, scores_m, offsets_m, args.rho) / m
    lethe_m = min(_time(partition_global, scores_m, args.rho) for _ in range(3))
    lethe_m_mem = traced_peak(partition_global, scores_m, args.rho)
    del scores_m, offsets_m

    print(f"{'tokens':>12} {'lethe s':>9} {'lethe MiB':>10} {'paper s':>10} "
          f"{'paper GiB':>10} {'speedup':>8}  note")
    paper_total = build_s + sort_s
    print(f"{m:>12,} {lethe_m:>9.4f} {lethe_m_mem / 2**20:>10.1f} {paper_total:>10.3f} "
          f"{paper_bytes_per_token * m / 2**30:>10.2f} {paper_total / lethe_m:>8.1f}  "
          f"paper MEASURED (build {build_s:.2f} s + sort {sort_s:.2f} s)")

    speedup = float("nan")
    for n in sizes:
        scores, _ = synthetic_corpus(n)
        best = min(_time(partition_global, scores, args.rho) for _ in range(args.repeats))
        lethe_mem = traced_peak(partition_global, scores, args.rho)
        paper_n = build_s * n / m + sort_s * nlogn_scale(n, m)
        speedup = paper_n / best
        print(f"{n:>12,} {best:>9.3f} {lethe_mem / 2**20:>10.1f} {paper_n:>10.1f} "
              f"{paper_bytes_per_token * n / 2**30:>10.1f} {speedup:>8.1f}  "
              f"paper EXTRAPOLATED from {m:,}")
        del scores
        gc.collect()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"# peak RSS of this whole process: {peak_kib / 2**20:.2f} GiB "
          "(scores themselves are 4 bytes/token)")
    print(f"ratio lethe/paper partition_speedup {speedup:.1f}")


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
