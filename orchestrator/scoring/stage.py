"""The scoring stage: a pool of Ray actors, each holding a TokenScorer, scoring whole blocks.

The corpus is split into fixed blocks of `block_rows` rows by sorted sample_id (`blocks.py`).
A block is given whole to one actor, which reads its rows from the tokens input, scores them
and writes `part-<block>.parquet` itself (unique temp name, fsync, rename), then returns a
small summary (counts, seconds). No scored row passes through the driver, so the driver's
memory does not grow with the corpus; it holds the sample_id column and the block plan.

Resumable by construction: a killed run loses at most the blocks in flight; a rerun scores
only the blocks whose file is missing, and a finished stage (`_SUCCESS.json`) is skipped.

Why actors and not a Ray Data pipeline: the actors are started first, so their process
start-up and model loads overlap the driver's planning (and the staging pass, when one is
needed); there is no streaming executor, read task or repartition between the input and the
models, which on the small default was most of the stage's wall time. Ray still places the
actors (CPUs/GPUs per actor) and restarts nothing silently: an actor failure stops the stage
with the block named, and the rerun resumes.

Output: `out_dir/part-*.parquet` with `sample_id` (int64), `base_loss`, `ref_loss`
(list<float32>, aligned with input_ids, NaN off response tokens), rows sorted by sample_id.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cache import SUCCESS, atomic_path, atomic_write_json, clean_stale_temps
from orchestrator.config import ScoringConfig
from orchestrator.scoring.blocks import (
    DIRECT_READ_MAX_EXTRA_BYTES,
    STAGING_DIR,
    BlockPlan,
    BlockRead,
    CorpusLayout,
    part_path,
    read_block,
    score_files,
    stage_pieces,
)

SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("base_loss", pa.list_(pa.float32())),
        ("ref_loss", pa.list_(pa.float32())),
    ]
)
# Blocks queued per actor: the next block waits inside the actor, so it starts the moment
# the previous one ends, without a round trip to the driver.
IN_FLIGHT_PER_ACTOR = 2


def _table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """pyarrow rows -> the TokenScorer's numpy dict (ragged object arrays)."""
    batch: dict[str, np.ndarray] = {"sample_id": table["sample_id"].to_numpy().astype(np.int64)}
    for name in ("input_ids", "response_mask"):
        col = table[name].combine_chunks()
        # Offsets of a sliced ListArray are absolute positions in its (unsliced) child.
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
        rows = np.empty(len(col), dtype=object)
        for i in range(len(col)):
            rows[i] = values[offsets[i] : offsets[i + 1]]
        batch[name] = rows
    return batch


def _list_column(rows: list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(rows).astype(np.float32) if len(rows) else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file so that readers see all of it or nothing, even after a crash
    (`cache.atomic_path`: a unique temp name starting with "_", which dataset readers skip,
    fsynced, renamed, the folder fsynced; a failed write leaves no temp file)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class BlockScorer:
    """One actor: loads both models once, then scores and writes whole blocks.

    Plain class (Ray wraps it with `ray.remote`): a block is read, scored in sample_id order
    in calls of `batch_size` rows, and written as one part file.
    """

    def __init__(self, out_dir: str, batch_size: int, **scorer_kwargs: Any) -> None:
        from orchestrator.scoring.scorer import TokenScorer

        t0 = time.perf_counter()
        base_path = scorer_kwargs.pop("base_path")
        ref_path = scorer_kwargs.pop("ref_path")
        self.scorer = TokenScorer(base_path, ref_path, **scorer_kwargs)
        self.out_dir, self.batch_size = Path(out_dir), int(batch_size)
        self.load_seconds = time.perf_counter() - t0

    def ready(self) -> float:
        return self.load_seconds

    def score_block(self, spec: BlockRead) -> dict:
        t0 = time.perf_counter()
        table = read_block(spec)
        t1 = time.perf_counter()
        sids, base, ref = [], [], []
        real = computed = scored = 0
        for start in range(0, table.num_rows, self.batch_size):
            out = self.scorer(_table_to_batch(table.slice(start, self.batch_size)))
            sids.append(out["sample_id"])
            base.extend(out["base_loss"])
            ref.extend(out["ref_loss"])
            real += sum(len(r) for r in out["base_loss"])
            computed += int(out["padded_length"].sum())
            scored += sum(int(np.count_nonzero(~np.isnan(r))) for r in out["base_loss"])
        t2 = time.perf_counter()
        scores = pa.table([pa.array(np.concatenate(sids), pa.int64()), _list_column(base),
                           _list_column(ref)], schema=SCORE_SCHEMA)
        write_atomic(scores, part_path(self.out_dir, spec.block))
        return {"block": spec.block, "rows": table.num_rows, "real_tokens": real,
                "computed_tokens": computed, "scored_tokens": scored, "read_s": t1 - t0,
                "score_s": t2 - t1, "write_s": time.perf_counter() - t2}


def scheduling_strategy(cfg: ScoringConfig) -> str:
    """Where Ray puts the scoring actors: SPREAD by default (one per node while nodes last:
    each node's memory bandwidth and GPUs serve one actor, and a lost node loses only its
    blocks); `scoring.scheduling_strategy: DEFAULT` packs them where Ray prefers."""
    value = getattr(cfg, "scheduling_strategy", None) or "SPREAD"
    if value not in ("SPREAD", "DEFAULT"):
        raise ValueError(f"scoring.scheduling_strategy must be SPREAD or DEFAULT, got {value!r}")
    return value


def _scorer_kwargs(base_path: str, ref_path: str, cfg: ScoringConfig, trust_remote_code: bool,
                   attn_implementation: str | None = None,
                   base_revision: str | None = None) -> dict:
    # The device follows the config, never what happens to be visible: an actor that asked
    # for GPUs fails clearly without one, and a CPU actor on a GPU node leaves the GPUs alone.
    return {"base_path": str(base_path), "ref_path": str(ref_path), "dtype": cfg.dtype,
            "device": "cuda" if cfg.num_gpus_per_actor > 0 else "cpu",
            "token_budget": cfg.token_budget, "chunk_size": cfg.chunk_size,
            "packing": cfg.packing, "trust_remote_code": trust_remote_code,
            "attn_implementation": attn_implementation, "base_revision": base_revision}


def _staged_reads(ray, layout: CorpusLayout, plan: BlockPlan, todo: list[int],
                  staging: Path) -> list[BlockRead]:
    """One pass over the input (a Ray task per row group) into per-block piece files."""
    shutil.rmtree(staging, ignore_errors=True)
    # num_cpus=0: the actors may hold every CPU slot already; a staging task must never
    # wait for them (it is one streaming pass per row group, mostly I/O).
    task = ray.remote(num_cpus=0)(stage_pieces)
    wanted = np.array(todo, dtype=np.int64)
    refs = [task.remote(path, g, plan.starts, wanted, str(staging), f"{i:05d}")
            for i, (path, g) in enumerate(layout.group_sources())]
    pieces: dict[int, list[str]] = {}
    for part in ray.get(refs):
        for b, paths in part.items():
            pieces.setdefault(b, []).extend(paths)
    return [plan.read(b, tuple((p, None) for p in sorted(pieces.get(b, [])))) for b in todo]


def _run_pool(ray, actors: list, reads: list[BlockRead]) -> list[dict]:
    """Keep IN_FLIGHT_PER_ACTOR blocks queued on every actor until all are done."""
    queue, pending, done = deque(reads), {}, []

    def submit(actor) -> None:
        spec = queue.popleft()
        pending[actor.score_block.remote(spec)] = (actor, spec.block)

    for actor in actors:
        for _ in range(IN_FLIGHT_PER_ACTOR):
            if queue:
                submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor, block = pending.pop(ready[0])
        try:
            done.append(ray.get(ready[0]))
        except Exception as exc:
            raise RuntimeError(f"scoring block {block} failed (rerun to resume from the blocks "
                               f"already written): {exc}") from exc
        if queue:
            submit(actor)
    return done


def run_scoring(
    tokens_path: Path,
    base_path: str,
    ref_path: str,
    cfg: ScoringConfig,
    out_dir: Path,
    *,
    block_rows: int = 2048,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    base_revision: str | None = None,
) -> Path:
    """Score every sample of tokens.parquet with both models; returns `out_dir`.

    `block_rows` fixes the resume granularity (rows per part file). Needs a running Ray
    (ray.init by the caller). Prints tokens scored, tokens/s, padding waste and where the
    time went (actor start-up and model loads, staging, scoring).
    """
    import ray

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / SUCCESS).is_file():
        print(f"scoring: {out_dir} is complete ({SUCCESS} present); skipping")
        return out_dir
    start = time.perf_counter()
    clean_stale_temps(out_dir)  # left by a killed writer (the caller holds the stage lock)
    layout = CorpusLayout.read(tokens_path)
    plan = BlockPlan.create(layout.sample_ids, block_rows)
    plan.reconcile(out_dir)
    todo = [b for b in range(plan.num_blocks) if not part_path(out_dir, b).is_file()]
    skipped = plan.num_blocks - len(todo)
    timings: dict[str, float] = {}
    done: list[dict] = []
    staging, staged = out_dir / STAGING_DIR, False
    if todo:
        # Actors first: their start-up and model loads overlap everything below.
        remote = ray.remote(BlockScorer).options(num_cpus=cfg.num_cpus_per_actor,
                                                 num_gpus=cfg.num_gpus_per_actor or None,
                                                 scheduling_strategy=scheduling_strategy(cfg))
        kwargs = _scorer_kwargs(base_path, ref_path, cfg, trust_remote_code, attn_implementation,
                                base_revision)
        actors = [remote.remote(str(out_dir), cfg.batch_size, **kwargs)
                  for _ in range(min(cfg.num_actors, len(todo)))]
        try:
            t = time.perf_counter()
            reads, decoded = layout.direct_reads(plan, todo)
            total = int(layout.group_bytes.sum())
            staged = decoded - total > DIRECT_READ_MAX_EXTRA_BYTES
            if staged:
                reads = _staged_reads(ray, layout, plan, todo, staging)
            timings["plan_s"] = time.perf_counter() - t
            load = ray.get([a.ready.remote() for a in actors])
            timings["actors_ready_s"] = time.perf_counter() - start
            timings["model_load_s"] = max(load)
            t = time.perf_counter()
            done = _run_pool(ray, actors, reads)
            timings["score_wall_s"] = time.perf_counter() - t
        finally:
            for actor in actors:
                ray.kill(actor)
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    real = sum(d["real_tokens"] for d in done)
    computed = sum(d["computed_tokens"] for d in done)
    scored = sum(d["scored_tokens"] for d in done)
    for key in ("read_s", "score_s", "write_s"):
        timings[f"actor_{key}"] = sum(d[key] for d in done)
    summary = {
        "blocks": plan.num_blocks,
        "blocks_computed": len(done),
        "blocks_skipped": skipped,
        "rows": int(len(layout.sample_ids)),
        "tokens_this_run": real,
        "scored_tokens_this_run": scored,
        "computed_tokens_this_run": computed,
        "seconds": seconds,
        "tokens_per_s": real / seconds if seconds > 0 else 0.0,
        "padding_waste": 1 - real / computed if computed else 0.0,
        "staged": staged,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "files": [p.name for p in score_files(out_dir)],
    }
    print(
        f"scoring: {real} tokens ({scored} response) through base + reference in {seconds:.1f} s "
        f"= {summary['tokens_per_s']:.0f} tokens/s; padding waste "
        f"{100 * summary['padding_waste']:.1f} %; blocks computed {len(done)}, skipped {skipped}; "
        f"time: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    )
    atomic_write_json(out_dir / SUCCESS, {"stage": "score", "finished_at": time.time(), **summary})
    return out_dir
