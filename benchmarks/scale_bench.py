"""Driver scale: score and partition synthetic corpora of growing size with a very tiny model.

    .venv/bin/python benchmarks/scale_bench.py [--sizes 20k,100k,200k] [--actors 2]

For each size, in fresh child processes (so every figure is that size's own):
- scoring: `run_scoring` (Ray Data: read_parquet, an actor pool, write_parquet) on a tokens.parquet
  written like the data stage writes it (one file, one row group); the driver's peak RSS is
  sampled every 10 ms during the call and reported absolute and as growth above its RSS
  just before the call (torch, Ray and pyarrow are already imported then);
- partition: `run_partition` on those scores (in-memory path below 50 M tokens): wall time
  and the process's peak RSS growth.
The model is a 1-layer, 16-wide Llama (vocab 256) and rows have 8-40 tokens, so the bench
stays within minutes on 2 cores while the row count, which is what the driver's memory
could grow with, is real. Last line: `ratio driver_rss largest/smallest <x>` (peak RSS of
the scoring driver at the largest size over the smallest; goal <= 1.2).

Also the helpers the other benches share: `write_tokens` and `save_models`.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import PeakRss, in_child  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 32}
DEMO_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 128}


def write_tokens(path: Path, rows: int, vocab: int, lengths: tuple[int, int], seed: int = 0) -> Path:
    """A tokens.parquet like the data stage's: sample_id order, one write (one row group),
    a prompt of 10-50 % of each row, the rest response."""
    rng = np.random.default_rng(seed)
    n = rng.integers(lengths[0], lengths[1] + 1, size=rows)
    offsets = np.concatenate(([0], np.cumsum(n))).astype(np.int64)
    ids = rng.integers(0, vocab, size=int(offsets[-1])).astype(np.int32)
    prompt = (n * rng.uniform(0.1, 0.5, size=rows)).astype(np.int64)
    pos = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], n)
    mask = (pos >= np.repeat(prompt, n)).astype(np.int8)
    off = pa.array(offsets)
    table = pa.table({
        "sample_id": pa.array(np.arange(rows, dtype=np.int64)),
        "input_ids": pa.LargeListArray.from_arrays(off, pa.array(ids)).cast(pa.list_(pa.int32())),
        "response_mask": pa.LargeListArray.from_arrays(off, pa.array(mask)).cast(pa.list_(pa.int8())),
        "num_tokens": pa.array(n.astype(np.int32)),
    })
    pq.write_table(table, path)
    return path


def save_models(root: Path, sizes: dict, vocab: int) -> tuple[str, str]:
    """(base, reference) Llama folders of the given sizes, different random weights."""
    from orchestrator.config import ModelSpec
    from orchestrator.models import build_model

    spec = ModelSpec(name="bench", family="llama", from_config=dict(sizes))
    paths = []
    for role, seed in (("base", 0), ("ref", 1)):
        path = Path(root) / role
        build_model(spec, vocab, seed=seed).save_pretrained(str(path))
        paths.append(str(path))
    return paths[0], paths[1]


def start_ray(num_cpus: int, tries: int = 4) -> None:
    """ray.init for a bench, retried: on a loaded shared machine the raylet can miss Ray's
    fixed 30 s start-up window."""
    import ray

    for attempt in range(tries):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for the start-up timeout
            ray.shutdown()
            if attempt == tries - 1:
                raise
            print(f"# ray.init failed ({exc}); retrying", flush=True)
            time.sleep(5)


def _score_child(args: dict, out: mp.Queue) -> None:
    import ray

    from orchestrator.config import ScoringConfig

    run_scoring = importlib.import_module(args["stage_module"]).run_scoring
    start_ray(args["actors"])
    cfg = ScoringConfig(num_actors=args["actors"], batch_size=256, token_budget=8192, chunk_size=2048)
    try:
        t0 = time.perf_counter()
        with PeakRss() as mem:
            run_scoring(Path(args["tokens"]), args["base"], args["ref"], cfg, Path(args["scores"]),
                        embedded=True)
        out.put({"seconds": time.perf_counter() - t0, "peak": mem.peak, "start": mem.start})
    finally:
        ray.shutdown()


def _partition_child(args: dict, out: mp.Queue) -> None:
    from orchestrator.config import PartitionConfig
    from orchestrator.partition import run_partition

    start = PeakRss.rss()
    t0 = time.perf_counter()
    run_partition(Path(args["tokens"]), Path(args["scores"]), PartitionConfig(rho=0.7),
                  Path(args["partition"]))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.put({"seconds": seconds, "peak": peak, "start": start})


def _parse(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20k,100k,200k")
    ap.add_argument("--actors", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--lengths", default="8,40", help="min,max tokens per row")
    ap.add_argument("--stage-module", default="orchestrator.scoring.stage",
                    help="module providing run_scoring (to measure another implementation)")
    a = ap.parse_args()
    sizes = [_parse(s) for s in a.sizes.split(",")]
    lengths = tuple(int(x) for x in a.lengths.split(","))
    vocab = 256
    root = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    print(f"# {a.actors} scoring actor(s); model {TINY_MODEL}, vocab {vocab}; rows of "
          f"{lengths[0]}-{lengths[1]} tokens; stage {a.stage_module}")
    print(f"{'samples':>9} {'tokens':>11} {'score s':>8} {'driver peak MiB':>16} "
          f"{'driver growth MiB':>18} {'partition s':>12} {'partition peak MiB':>19} "
          f"{'partition growth MiB':>21}")
    peaks = []
    try:
        base, ref = save_models(root, TINY_MODEL, vocab)
        for n in sizes:
            d = root / f"n{n}"
            d.mkdir()
            args = {"tokens": str(write_tokens(d / "tokens.parquet", n, vocab, lengths, seed=n)),
                    "base": base, "ref": ref, "scores": str(d / "scores"),
                    "partition": str(d / "partition"), "actors": a.actors,
                    "stage_module": a.stage_module}
            tokens = int(pq.read_table(args["tokens"], columns=["num_tokens"])["num_tokens"]
                         .to_numpy().sum())
            s = in_child(_score_child, args)
            p = in_child(_partition_child, args)
            peaks.append(s["peak"])
            mib = 2**20
            print(f"{n:>9,} {tokens:>11,} {s['seconds']:>8.1f} {s['peak'] / mib:>16.0f} "
                  f"{(s['peak'] - s['start']) / mib:>18.1f} {p['seconds']:>12.1f} "
                  f"{p['peak'] / mib:>19.0f} {(p['peak'] - p['start']) / mib:>21.1f}", flush=True)
            shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"ratio driver_rss largest/smallest {peaks[-1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
