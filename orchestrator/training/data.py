"""Training rows in worker memory, the reference subset, and the step plan.

A worker holds its shard as ragged arrays (flat values + offsets), so cutting a
micro-batch is O(batch) and nothing per step scans the corpus. The order of each epoch
is a seeded permutation of the shard, which makes the data position after a resume
exact: skip the micro-batches the checkpoint says were consumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.training.job import SubsetSpec

ALLOWED_CLASSES = {"token_class": (-1, 0, 1), "response_mask": (0, 1)}


@dataclass
class TokenRows:
    """Ragged token data: row i is `input_ids[offsets[i]:offsets[i+1]]` (same for classes)."""

    sample_ids: np.ndarray  # int64 [S]
    offsets: np.ndarray  # int64 [S+1]
    input_ids: np.ndarray  # int64 flat
    classes: np.ndarray  # int8 flat, +1 / -1 / 0

    def __len__(self) -> int:
        return len(self.sample_ids)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.classes[a:b]

    def take(self, idx: np.ndarray) -> TokenRows:
        idx = np.asarray(idx, dtype=np.int64)
        lengths = np.diff(self.offsets)[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = [self.input_ids[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        cls = [self.classes[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        cat = np.concatenate
        return TokenRows(
            self.sample_ids[idx],
            offsets,
            cat(ids) if ids else np.zeros(0, np.int64),
            cat(cls) if cls else np.zeros(0, np.int8),
        )


def _ragged(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column without going through Python lists."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ChunkedArray):  # combine_chunks of an empty chunked array
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], arr.type)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    # A sliced list array keeps the parent's values; rebase so offsets[0] == 0.
    values = values[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def rows_from_table(table: pa.Table, class_column: str) -> TokenRows:
    """Validate and convert a tokenized table. Errors name the offending sample_id."""
    for col in ("sample_id", "input_ids", class_column):
        if col not in table.column_names:
            raise ValueError(
                f"training data lacks column {col!r} (has {table.column_names}); "
                "token_class comes from the partition stage, response_mask from the data stage"
            )
    table = table.sort_by("sample_id")  # shard order independent of read/stream order
    sample_ids = table.column("sample_id").to_numpy().astype(np.int64)
    repeated = np.flatnonzero(sample_ids[1:] == sample_ids[:-1])
    if len(repeated):  # sorted: a repeat is adjacent (e.g. one row in two part files)
        raise ValueError(f"sample_id {sample_ids[repeated[0]]} occurs more than once in the "
                         f"training data ({len(repeated)} repeated ids): it would be trained "
                         "twice per epoch; check the part files of the input folder")
    ids, offsets = _ragged(table.column("input_ids"))
    cls, cls_offsets = _ragged(table.column(class_column))
    lengths, cls_lengths = np.diff(offsets), np.diff(cls_offsets)
    bad = np.flatnonzero(lengths != cls_lengths)
    if len(bad):
        i = bad[0]
        raise ValueError(
            f"sample_id {sample_ids[i]}: {class_column} has {cls_lengths[i]} entries but "
            f"input_ids has {lengths[i]} (per-token columns must align with input_ids)"
        )
    allowed = np.array(ALLOWED_CLASSES[class_column])
    wrong = np.flatnonzero(~np.isin(cls, allowed))
    if len(wrong):
        row = int(np.searchsorted(offsets, wrong[0], side="right") - 1)
        raise ValueError(
            f"sample_id {sample_ids[row]}: {class_column} value {int(cls[wrong[0]])} "
            f"not in {allowed.tolist()}"
        )
    return TokenRows(sample_ids, offsets, ids.astype(np.int64), cls.astype(np.int8))


def select_subset(sample_ids: np.ndarray, spec: SubsetSpec) -> np.ndarray:
    """Sorted sample_ids of a seeded random subset of the pool (the reference model's data)."""
    pool = np.sort(np.asarray(sample_ids, dtype=np.int64))
    n = len(pool)
    k = spec.size if spec.size is not None else max(1, int(round(spec.fraction * n)))
    if k > n:
        raise ValueError(f"subset.size {k} exceeds the training pool of {n} rows")
    rng = np.random.default_rng(spec.seed)
    return np.sort(rng.choice(pool, size=k, replace=False))


def read_table(path: str, columns: list[str], keep_ids: np.ndarray | None = None) -> pa.Table:
    table = pq.read_table(path, columns=columns)
    if keep_ids is not None:
        table = table.filter(pc.is_in(table.column("sample_id"), pa.array(keep_ids)))
    return table


def shard_for_rank(rows: TokenRows, rank: int, world: int) -> TokenRows:
    """Strided, equal-size shard (the same rule as a distributed sampler with drop)."""
    per_rank = len(rows) // world
    if per_rank == 0:
        raise ValueError(f"{len(rows)} training rows cannot feed {world} workers")
    return rows.take(np.arange(rank, per_rank * world, world))


@dataclass(frozen=True)
class StepPlan:
    """How micro-batches map to optimizer steps, fixed before training starts.

    Micro-batches form one stream across epochs (epochs may be fractional); optimizer step
    s consumes stream items [s*gas, (s+1)*gas). A stream item k lies in epoch k // per_epoch
    at position k % per_epoch of that epoch's seeded order.
    """

    rows_per_rank: int
    micro_batch_size: int
    grad_accum: int
    micro_per_epoch: int
    total_updates: int

    @classmethod
    def build(cls, rows_per_rank: int, micro: int, gas: int, epochs: float,
              max_steps: int | None) -> StepPlan:
        per_epoch = math.ceil(rows_per_rank / micro)
        if max_steps is not None:
            total = max_steps
        else:
            # Whole optimizer steps only: the tail micro-batches of a fractional step are
            # dropped rather than left half-accumulated.
            total = max(1, math.floor(epochs * per_epoch / gas))
        return cls(rows_per_rank, micro, gas, per_epoch, total)

    def locate(self, stream_index: int) -> tuple[int, int]:
        return divmod(stream_index, self.micro_per_epoch)

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.rows_per_rank)

    def micro_batch_rows(self, order: np.ndarray, position: int) -> np.ndarray:
        return order[position * self.micro_batch_size : (position + 1) * self.micro_batch_size]
