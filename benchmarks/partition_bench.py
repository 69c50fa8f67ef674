"""Global partition: Lethe's O(N) selection vs a full sort (the paper's Python sort, np.argsort).

Three ways to find the top floor(rho * N) tokens of a flat float32 score array:
- lethe: `partition_global` (np.partition for the k-th value, then one pass);
- argsort: the vectorised full sort, `np.argsort` of the whole array, then the top k;
- paper: a Python list of (score, sample, position) tuples sorted globally (the paper's code).

Every figure is MEASURED at the size printed; nothing is extrapolated. The paper's sort is
measured at 1.5 M tokens and at the largest size whose estimated memory (from the 1.5 M run)
fits under --paper-max-gib and half of the available memory (at least 30 M tokens on a
machine with ~8 GiB to spare). Each paper run is a fresh child process, so its memory is the
child's peak RSS above its start. Lethe and argsort memory = peak bytes allocated during the
call (tracemalloc, separate untimed pass), input scores excluded.

    .venv/bin/python benchmarks/partition_bench.py [--sizes 10M,30M,100M] [--paper-max-gib 8]

Last line: `ratio lethe/paper partition_speedup <x>` at the largest size the paper's sort ran.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import in_child  # noqa: E402

from orchestrator.method.partition import partition_global, positive_count  # noqa: E402

PAPER_LADDER = [30_000_000, 40_000_000, 50_000_000, 60_000_000, 80_000_000, 100_000_000]


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


def argsort_partition(scores: np.ndarray, rho: float) -> np.ndarray:
    """Vectorised full sort: +1 for the k highest scores, -1 for the rest."""
    order = np.argsort(scores, kind="stable")
    classes = np.full(scores.size, -1, dtype=np.int8)
    k = positive_count(scores.size, rho)
    if k:
        classes[order[scores.size - k:]] = 1
    return classes


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _paper_child(n: int, rho: float, out: mp.Queue) -> None:
    scores, offsets = synthetic_corpus(n, seed=1)
    start = _rss()
    build, sort = paper_partition(scores, offsets, rho)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.put({"build_s": build, "sort_s": sort, "peak_bytes": peak - start})


def measure_paper(n: int, rho: float) -> dict:
    """The paper's sort on n tokens in a fresh process (its own peak RSS)."""
    return in_child(_paper_child, n, rho, what=f"paper sort on {n:,} tokens")


def traced_peak(fn, *args) -> int:
    """Peak bytes allocated while fn runs, from tracemalloc (numpy buffers are traced too)."""
    gc.collect()
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,30M,100M", help="lethe/argsort sizes, e.g. 1M,10M,100M")
    ap.add_argument("--paper-small", default="1.5M", help="tokens for the small paper run")
    ap.add_argument("--paper-max-gib", type=float, default=8.0,
                    help="memory cap for the largest paper run (shared machine)")
    ap.add_argument("--paper-sizes", default=None,
                    help="explicit paper sizes (skips the memory-based choice), e.g. 1.5M,30M")
    ap.add_argument("--rho", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=2, help="best-of for lethe and argsort")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    avail = psutil.virtual_memory().available
    need = max(sizes) * 4 * 5  # scores + partition copy + argsort int64 indices, with slack
    if need > avail:
        sys.exit(f"largest size needs ~{need / 2**30:.1f} GiB, only {avail / 2**30:.1f} available")

    small = parse_size(args.paper_small)
    paper = {small: measure_paper(small, args.rho)}
    per_token = paper[small]["peak_bytes"] / small
    if args.paper_sizes:
        paper_sizes = [parse_size(s) for s in args.paper_sizes.split(",")]
    else:
        cap = min(args.paper_max_gib * 2**30, 0.5 * psutil.virtual_memory().available)
        fits = [n for n in PAPER_LADDER if n * per_token * 1.1 <= cap]
        if not fits:
            sys.exit(f"the paper's sort needs ~{per_token:.0f} B/token: 30M tokens do not fit "
                     f"under {cap / 2**30:.1f} GiB")
        paper_sizes = [fits[-1]]
    for n in paper_sizes:
        if n not in paper:
            paper[n] = measure_paper(n, args.rho)
            gc.collect()

    print(f"# every row MEASURED; paper's sort in a fresh process (its peak RSS growth); lethe "
          f"and argsort: best of {args.repeats}, memory = tracemalloc peak, scores excluded; "
          f"rho {args.rho}")
    print(f"{'tokens':>12} {'lethe s':>9} {'lethe MiB':>10} {'argsort s':>10} {'argsort MiB':>12} "
          f"{'paper s':>9} {'paper GiB':>10} {'vs argsort':>11} {'vs paper':>9}")
    vs_argsort = largest_paper_ratio = float("nan")
    for n in sorted(set(sizes) | set(paper)):
        scores, _ = synthetic_corpus(n, seed=1 if n in paper else 0)
        lethe = min(_time(partition_global, scores, args.rho) for _ in range(args.repeats))
        lethe_mem = traced_peak(partition_global, scores, args.rho)
        argsort = min(_time(argsort_partition, scores, args.rho) for _ in range(args.repeats))
        argsort_mem = traced_peak(argsort_partition, scores, args.rho)
        # Same number of positives (which tied tokens win may differ: the paper has no rule).
        assert np.count_nonzero(argsort_partition(scores, args.rho) == 1) == positive_count(n, args.rho)
        row = (f"{n:>12,} {lethe:>9.3f} {lethe_mem / 2**20:>10.1f} {argsort:>10.3f} "
               f"{argsort_mem / 2**20:>12.1f}")
        vs_argsort = argsort / lethe
        if n in paper:
            p = paper[n]
            total = p["build_s"] + p["sort_s"]
            vs_paper = total / lethe
            largest_paper_ratio = vs_paper
            row += (f" {total:>9.2f} {p['peak_bytes'] / 2**30:>10.2f} {vs_argsort:>11.1f} "
                    f"{vs_paper:>9.1f}  (paper: build {p['build_s']:.1f} s + sort {p['sort_s']:.1f} s)")
        else:
            row += f" {'-':>9} {'-':>10} {vs_argsort:>11.1f} {'-':>9}"
        print(row, flush=True)
        del scores
        gc.collect()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"# peak RSS of this process (lethe + argsort rows): {peak_kib / 2**20:.2f} GiB")
    largest = max(paper)
    print(f"# headlines: lethe/argsort at {max(sizes):,} tokens, lethe/paper at {largest:,} tokens")
    print(f"ratio lethe/argsort partition_speedup {vs_argsort:.1f}")
    print(f"ratio lethe/paper partition_speedup {largest_paper_ratio:.1f}")


if __name__ == "__main__":
    main()
