"""The scoring stage: a Ray Data pipeline around the plain TokenScorer.

    read_parquet(tokens) -> [drop rows already scored] -> map_batches(ScoreBatches, an actor
    pool of min..max actors, each holding both models) -> write_parquet(out_dir)

Ray Data schedules it: the actor pool grows from `scoring.min_actors` to `scoring.num_actors`
while there is work and room (on a cluster, pending actors are demand the autoscaler sees),
restarts an actor whose process dies and retries its tasks there (Ray Data's defaults),
bounds the memory in flight, and shows the stage in the dashboard's Data view. Batches of
`scoring.batch_size` rows reach the scorer, which buckets them by length (scorer.py).

No scored row passes through the driver: the write runs on the workers, one
`part-<write uuid>_<task>-<i>.parquet` per write task. The driver reads the sample_id
column of the tokens (and of finished part files, to resume) and small per-actor counters.

Resumable: a killed run keeps every part file it finished; a rerun scores only the rows in
none of them (`blocks.ScoredParts`), and a finished stage (`_SUCCESS.json`) is skipped.
A rerun's rows meet in other batches than before, so its scores may differ from an
uninterrupted run's in the last bits (|diff| < 1e-6 on the tests' models), never more.

Output: `out_dir/part-*.parquet` with `sample_id` (int64), `base_loss`, `ref_loss`
(list<float32>, aligned with input_ids, NaN off response tokens); rows in no set order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.cache import SUCCESS, atomic_write_json
from orchestrator.config import ScoringConfig
from orchestrator.scoring.blocks import (
    PART_PREFIX,
    ScoredParts,
    corpus_sample_ids,
    score_files,
)

SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("base_loss", pa.list_(pa.float32())),
        ("ref_loss", pa.list_(pa.float32())),
    ]
)
# Per-actor counters (tokens, seconds), one small JSON per actor incarnation; "_" keeps
# them out of the Parquet readers' way.
STATS_DIR = "_actor_stats"
STATS_FILE = "_ray_data_stats.txt"  # Ray Data's own stats of the stage (`Dataset.stats()`)


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
    flat = np.concatenate(list(rows)).astype(np.float32) if len(rows) else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))


class ScoreBatches:
    """The Ray Data UDF: one TokenScorer per pool actor, Arrow batches in and out.

    Its counters (tokens, padding, seconds) go to `stats_dir/<actor>.json` after each batch,
    so the driver can report them without receiving any scored row.
    """

    def __init__(self, scorer_kwargs: dict[str, Any], stats_dir: str) -> None:
        from orchestrator.scoring.scorer import TokenScorer

        self.started_at = time.time()
        kwargs = dict(scorer_kwargs)
        self.scorer = TokenScorer(kwargs.pop("base_path"), kwargs.pop("ref_path"), **kwargs)
        self.ready_at = time.time()
        self.stats_path = Path(stats_dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.score_s = 0.0
        self.first_batch_at: float | None = None

    def __call__(self, table: pa.Table) -> pa.Table:
        t0 = time.time()
        self.first_batch_at = self.first_batch_at or t0
        out = self.scorer(_table_to_batch(table))
        scores = pa.table([pa.array(out["sample_id"], pa.int64()), _list_column(out["base_loss"]),
                           _list_column(out["ref_loss"])], schema=SCORE_SCHEMA)
        self.score_s += time.time() - t0
        self._write_stats()
        return scores

    def _write_stats(self) -> None:
        c = self.scorer.counters
        body = {"started_at": self.started_at, "ready_at": self.ready_at,
                "first_batch_at": self.first_batch_at, "last_batch_at": time.time(),
                "score_s": self.score_s, "rows": c.rows, "real_tokens": c.real_tokens,
                "computed_tokens": c.computed_tokens, "scored_tokens": c.scored_tokens}
        atomic_write_json(self.stats_path, body)


def _drop_scored(table: pa.Table, scored: np.ndarray) -> pa.Table:
    """The rows whose sample_id is not in `scored` (sorted): what a rerun still scores."""
    sids = table["sample_id"].to_numpy()
    at = np.searchsorted(scored, sids)
    done = (at < len(scored)) & (scored[np.minimum(at, len(scored) - 1)] == sids)
    return table.filter(pa.array(~done))


def scheduling_strategy(cfg: ScoringConfig) -> str:
    """Where Ray puts the scoring actors: SPREAD by default (one per node while nodes last:
    each node's memory bandwidth and GPUs serve one actor, and a lost node loses only its
    actor); `scoring.scheduling_strategy: DEFAULT` packs them where Ray prefers."""
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


class _PartNames:
    """`part-<write uuid>_<task index>`: unique per write, stable across a task's retries
    (a retried write task rewrites its own file, so no row lands in two files)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{PART_PREFIX}{write_uuid}_{task_index:06d}.parquet"


def _part_names():
    from ray.data.datasource import FilenameProvider

    return type("PartNames", (_PartNames, FilenameProvider), {})()


def build_pipeline(tokens_path: Path, cfg: ScoringConfig, scorer_kwargs: dict,
                   scored: np.ndarray, stats_dir: Path, embedded: bool):
    """The Ray Data dataset that scores the rows of `tokens_path` not in `scored` (lazy)."""
    import ray

    from orchestrator.scoring.data_context import (
        block_rows_for,
        light_task_cpus,
        read_tokens,
        stage_context,
    )

    ctx = stage_context(embedded=embedded, scheduling_strategy=scheduling_strategy(cfg))
    ds = read_tokens(tokens_path, ctx, embedded=embedded, block_rows=block_rows_for(cfg.batch_size))
    if scored.size:
        ds = ds.map_batches(_drop_scored, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"scored": scored}, **light_task_cpus(embedded))
    max_actors = cfg.num_actors
    min_actors = min(cfg.min_actors, max_actors)
    return ds.map_batches(
        ScoreBatches,
        fn_constructor_kwargs={"scorer_kwargs": scorer_kwargs, "stats_dir": str(stats_dir)},
        # Every actor up to the cap is asked for at start (their model loads overlap; a
        # cluster's autoscaler sees the ones that do not fit yet); the pool shrinks back
        # to min_actors when they idle.
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors,
                                           initial_size=max_actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor or None,
        # Faults: Ray Data's actor pool defaults (max_restarts=-1, max_task_retries=-1):
        # an actor whose process dies is restarted (its models loaded again) and the
        # batches it held are retried there. An exception in the scorer is not retried: it
        # fails the stage, naming it.
    )


def _actor_summary(stats_dir: Path, start: float) -> tuple[dict[str, int], dict[str, float]]:
    stats = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("*.json"))]
    counts = {k: sum(int(s[k]) for s in stats)
              for k in ("rows", "real_tokens", "computed_tokens", "scored_tokens")}
    timings: dict[str, float] = {"actors": float(len(stats))}
    if stats:
        timings["actors_ready_s"] = min(s["ready_at"] for s in stats) - start
        timings["model_load_s"] = max(s["ready_at"] - s["started_at"] for s in stats)
        first = min(s["first_batch_at"] for s in stats if s["first_batch_at"])
        timings["score_wall_s"] = max(s["last_batch_at"] for s in stats) - first
        timings["actor_score_s"] = sum(s["score_s"] for s in stats)
    return counts, timings


def run_scoring(
    tokens_path: Path,
    base_path: str,
    ref_path: str,
    cfg: ScoringConfig,
    out_dir: Path,
    *,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    base_revision: str | None = None,
    embedded: bool | None = None,
) -> Path:
    """Score every sample of tokens.parquet with both models; returns `out_dir`.

    Needs a running Ray (ray.init by the caller). `embedded` (default: the pipeline's
    LETHE_EMBEDDED_RAY) applies the settings that only help a small local instance
    (data_context.py). Prints tokens scored, tokens/s, padding waste and where the time
    went; writes Ray Data's stats of the stage to `out_dir/_ray_data_stats.txt`.
    """
    import ray  # noqa: F401  (fails here, not inside the pipeline, without Ray)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / SUCCESS).is_file():
        print(f"scoring: {out_dir} is complete ({SUCCESS} present); skipping")
        return out_dir
    if embedded is None:
        embedded = os.environ.get("LETHE_EMBEDDED_RAY") == "1"
    start = time.time()
    corpus = corpus_sample_ids(tokens_path)
    done = ScoredParts.reconcile(out_dir, corpus)
    before = {p.name for p in done.files}
    stats_dir = out_dir / STATS_DIR
    shutil.rmtree(stats_dir, ignore_errors=True)  # a killed run's counters are not this run's
    stats_dir.mkdir()
    todo = len(corpus) - len(done.sample_ids)
    ray_stats = ""
    if todo:
        from orchestrator.scoring.data_context import light_task_cpus, write_concurrency

        kwargs = _scorer_kwargs(base_path, ref_path, cfg, trust_remote_code, attn_implementation,
                                base_revision)
        ds = build_pipeline(tokens_path, cfg, kwargs, done.sample_ids, stats_dir, embedded)
        ds.write_parquet(str(out_dir), filename_provider=_part_names(),
                         ray_remote_args=light_task_cpus(embedded),
                         concurrency=write_concurrency(embedded))
        ray_stats = ds.stats()
    check = ScoredParts.reconcile(out_dir, corpus)
    if len(check.sample_ids) != len(corpus):
        missing = np.setdiff1d(corpus, check.sample_ids)
        raise RuntimeError(f"scoring ended without scores for {missing.size} of {len(corpus)} "
                           f"rows (first: sample_id {int(missing[0])}); rerun to score them")
    seconds = time.time() - start
    counts, timings = _actor_summary(stats_dir, start)
    shutil.rmtree(stats_dir, ignore_errors=True)
    real, computed = counts["real_tokens"], counts["computed_tokens"]
    summary = {
        "rows": int(len(corpus)),
        "rows_scored_this_run": int(todo),
        "rows_skipped": int(len(done.sample_ids)),
        "files_written": len({p.name for p in check.files} - before),
        "tokens_this_run": real,
        "scored_tokens_this_run": counts["scored_tokens"],
        "computed_tokens_this_run": computed,
        "seconds": seconds,
        "tokens_per_s": real / seconds if seconds > 0 else 0.0,
        "padding_waste": 1 - real / computed if computed else 0.0,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "files": [p.name for p in score_files(out_dir)],
    }
    print(
        f"scoring: {real} tokens ({counts['scored_tokens']} response) through base + reference "
        f"in {seconds:.1f} s = {summary['tokens_per_s']:.0f} tokens/s; padding waste "
        f"{100 * summary['padding_waste']:.1f} %; rows scored {todo}, already scored "
        f"{len(done.sample_ids)}; time: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    )
    if ray_stats:  # a file, not the log: ~60 lines per stage
        (out_dir / STATS_FILE).write_text(ray_stats)
        print(f"scoring: Ray Data's stats of the stage (operators, actors, rows, times): "
              f"{out_dir / STATS_FILE}")
    atomic_write_json(out_dir / SUCCESS, {"stage": "score", "finished_at": time.time(), **summary})
    return out_dir
