"""The scoring stage: Ray Data over tokens.parquet with an actor pool of TokenScorers.

Resumable by construction. The corpus is split into fixed blocks of `block_rows` rows by
sorted sample_id; each block's scores are written as `part-<block>.parquet` (tmp file, then
an atomic rename) as soon as all of its rows have come back, so a killed run loses at most
the blocks in flight. A rerun scores only the blocks whose file is missing, and a finished
stage (`_SUCCESS.json`) is skipped entirely.

Output: `out_dir/part-*.parquet` with `sample_id` (int64), `base_loss`, `ref_loss`
(list<float32>, aligned with input_ids, NaN off response tokens), rows sorted by sample_id.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cache import SUCCESS
from orchestrator.config import ScoringConfig
from orchestrator.scoring.blocks import BlockPlan, part_path, score_files
from orchestrator.scoring.scorer import TokenScorer

INPUT_COLUMNS = ["sample_id", "input_ids", "response_mask"]
SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("base_loss", pa.list_(pa.float32())),
        ("ref_loss", pa.list_(pa.float32())),
    ]
)


def _table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """pyarrow batch -> the TokenScorer's numpy dict (ragged object arrays)."""
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


def _list_column(rows: np.ndarray) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(list(rows)).astype(np.float32) if len(rows) else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))


class ScorerActor:
    """Ray Data actor: one TokenScorer per actor, pyarrow in and out (list<float32> columns)."""

    def __init__(self, **scorer_kwargs: Any) -> None:
        base_path = scorer_kwargs.pop("base_path")
        ref_path = scorer_kwargs.pop("ref_path")
        self.scorer = TokenScorer(base_path, ref_path, **scorer_kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        out = self.scorer(_table_to_batch(table))
        return pa.table(
            {
                "sample_id": pa.array(out["sample_id"], type=pa.int64()),
                "base_loss": _list_column(out["base_loss"]),
                "ref_loss": _list_column(out["ref_loss"]),
                "padded_length": pa.array(out["padded_length"], type=pa.int32()),
            }
        )


def _keep_blocks(table: pa.Table, starts: np.ndarray, wanted: np.ndarray) -> pa.Table:
    """Rows whose block (by sample_id) is in `wanted` (a filter pass before scoring)."""
    sids = table["sample_id"].to_numpy()
    blocks = np.searchsorted(starts, sids, side="right") - 1
    return table.filter(pa.array(np.isin(blocks, wanted)))


def _write_atomic(table: pa.Table, path: Path) -> None:
    # "_" prefix: a half-written file is invisible to readers of the folder as a dataset.
    tmp = path.with_name("_" + path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class _BlockWriter:
    """Buffers scored rows per block on the driver; writes a block when it is complete."""

    def __init__(self, plan: BlockPlan, out_dir: Path, blocks: list[int]) -> None:
        self.plan, self.out_dir = plan, out_dir
        self.pending = {b: [] for b in blocks}
        self.received = dict.fromkeys(blocks, 0)
        self.written: list[int] = []
        self.real_tokens = self.computed_tokens = self.scored_tokens = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        sids = table["sample_id"].to_numpy()
        lengths = pa.compute.list_value_length(table["base_loss"]).to_numpy()
        self.real_tokens += int(lengths.sum())
        self.computed_tokens += int(table["padded_length"].to_numpy().sum())
        # flatten() honours slices (`.values` would be the whole child array of a slice).
        flat = table["base_loss"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.scored_tokens += int(np.count_nonzero(~np.isnan(flat)))
        blocks = self.plan.block_of(sids)
        for b in np.unique(blocks):
            b = int(b)
            if b not in self.pending:
                raise RuntimeError(f"scoring returned sample_ids of block {b}, which was not requested")
            self.pending[b].append(table.filter(pa.array(blocks == b)))
            self.received[b] += int(np.count_nonzero(blocks == b))
            if self.received[b] == self.plan.block_size(b):
                self._flush(b)

    def _flush(self, b: int) -> None:
        table = pa.concat_tables(self.pending.pop(b)).select(SCORE_SCHEMA.names)
        table = table.sort_by("sample_id").cast(SCORE_SCHEMA)
        _write_atomic(table, part_path(self.out_dir, b))
        self.written.append(b)

    def check_complete(self) -> None:
        if self.pending:
            short = {b: (self.received[b], self.plan.block_size(b)) for b in sorted(self.pending)[:5]}
            raise RuntimeError(f"scoring ended with incomplete blocks (received, expected): {short}")


def run_scoring(
    tokens_path: Path,
    base_path: str,
    ref_path: str,
    cfg: ScoringConfig,
    out_dir: Path,
    *,
    block_rows: int = 2048,
    trust_remote_code: bool = False,
) -> Path:
    """Score every sample of tokens.parquet with both models; returns `out_dir`.

    `block_rows` fixes the resume granularity (rows per part file). Needs a running Ray
    (ray.init by the caller). Prints tokens scored, tokens/s and padding waste.
    """
    import ray

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / SUCCESS).is_file():
        print(f"scoring: {out_dir} is complete ({SUCCESS} present); skipping")
        return out_dir
    sample_ids = pq.read_table(tokens_path, columns=["sample_id"])["sample_id"].to_numpy()
    plan = BlockPlan.create(sample_ids, block_rows)
    plan.reconcile(out_dir)
    todo = [b for b in range(plan.num_blocks) if not part_path(out_dir, b).is_file()]
    skipped = plan.num_blocks - len(todo)
    start = time.perf_counter()
    writer = _BlockWriter(plan, out_dir, todo)
    if todo:
        ds = ray.data.read_parquet(str(tokens_path), columns=INPUT_COLUMNS)
        if skipped:
            ds = ds.map_batches(_keep_blocks, batch_format="pyarrow",
                                fn_kwargs={"starts": plan.starts, "wanted": np.array(todo)})
        # One Parquet file is one read block, and an actor pool only spreads whole blocks:
        # split the stream into batch-sized blocks (streaming, no shuffle) so every actor
        # gets work.
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
        scorer_kwargs = {
            "base_path": str(base_path), "ref_path": str(ref_path), "dtype": cfg.dtype,
            "token_budget": cfg.token_budget, "chunk_size": cfg.chunk_size,
            "packing": cfg.packing, "trust_remote_code": trust_remote_code,
        }
        ds = ds.map_batches(
            ScorerActor,
            fn_constructor_kwargs=scorer_kwargs,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_gpus=cfg.num_gpus_per_actor or None,
            num_cpus=cfg.num_cpus_per_actor,
        )
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(table)
        writer.check_complete()
    seconds = time.perf_counter() - start
    summary = {
        "blocks": plan.num_blocks,
        "blocks_computed": len(writer.written),
        "blocks_skipped": skipped,
        "rows": int(len(sample_ids)),
        "tokens_this_run": writer.real_tokens,
        "scored_tokens_this_run": writer.scored_tokens,
        "computed_tokens_this_run": writer.computed_tokens,
        "seconds": seconds,
        "tokens_per_s": writer.real_tokens / seconds if seconds > 0 else 0.0,
        "padding_waste": 1 - writer.real_tokens / writer.computed_tokens if writer.computed_tokens else 0.0,
        "files": [p.name for p in score_files(out_dir)],
    }
    print(
        f"scoring: {writer.real_tokens} tokens ({writer.scored_tokens} response) through base + "
        f"reference in {seconds:.1f} s = {summary['tokens_per_s']:.0f} tokens/s; padding waste "
        f"{100 * summary['padding_waste']:.1f} %; blocks computed {len(writer.written)}, "
        f"skipped {skipped}"
    )
    tmp = out_dir / (SUCCESS + ".tmp")
    tmp.write_text(json.dumps({"stage": "score", "finished_at": time.time(), **summary}, indent=2))
    os.replace(tmp, out_dir / SUCCESS)
    return out_dir
