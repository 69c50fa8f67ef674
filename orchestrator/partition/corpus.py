"""Joining tokens with their scores and flattening the response tokens (plain pyarrow/numpy).

The partition works on "response tokens": positions i >= 1 with response_mask[i] == 1.
Position 0 can never be a target (nothing precedes it), so the scorer leaves it NaN and the
partition gives it class 0 like every other untrained position. Flat corpus order is
sample_id order, then position; both partition paths use exactly that order for ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.method.partition import check_finite
from orchestrator.method.score import token_scores
from orchestrator.scoring.blocks import score_files


def list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, zero-based offsets [rows + 1]) of a list column, honouring slices."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


@dataclass
class ResponseScores:
    """The response tokens of a set of samples, flat in corpus order."""

    table: pa.Table  # the token rows, sorted by sample_id
    sample_ids: np.ndarray  # int64 [S]
    offsets: np.ndarray  # int64 [S+1] into scores
    scores: np.ndarray  # float32 [N]: method.score.token_scores (CE_base - CE_ref)
    positions: np.ndarray  # int64 [N]: token index inside its sample
    selected: np.ndarray  # bool [total tokens]: which flat token slots are response tokens
    token_offsets: np.ndarray  # int64 [S+1] into all tokens of `table`
    noise: np.ndarray | None  # int8 [N] ground-truth noise at response tokens, if known

    def with_classes(self, classes: np.ndarray) -> pa.Table:
        """`table` plus token_class (list<int8>): classes at response tokens, 0 elsewhere."""
        flat = np.zeros(self.selected.size, dtype=np.int8)
        flat[self.selected] = classes
        column = pa.ListArray.from_arrays(
            pa.array(self.token_offsets.astype(np.int32)), pa.array(flat, type=pa.int8())
        )
        return self.table.append_column("token_class", column)


def score_index(scores_path: Path) -> list[dict]:
    """(path, min, max sample_id) per score file, so lookups read only overlapping files."""
    index = []
    for path in score_files(scores_path):
        sids = pq.read_table(path, columns=["sample_id"])["sample_id"].to_numpy()
        if sids.size:
            index.append({"path": str(path), "min": int(sids.min()), "max": int(sids.max())})
    return index


def scores_for(sample_ids: np.ndarray, index: list[dict]) -> pa.Table:
    """The score rows of `sample_ids` (any order), read only from files that may hold them."""
    lo, hi = int(sample_ids.min()), int(sample_ids.max())
    wanted = pa.array(np.unique(sample_ids))
    parts = []
    for entry in index:
        if entry["max"] < lo or entry["min"] > hi:
            continue
        table = pq.read_table(entry["path"], columns=["sample_id", "base_loss", "ref_loss"])
        parts.append(table.filter(pc.is_in(table["sample_id"], value_set=wanted)))
    if not parts:
        raise ValueError(f"no scores for sample_id {int(sample_ids[0])} (and possibly others)")
    return pa.concat_tables(parts)


def join_response_scores(tokens: pa.Table, scores: pa.Table) -> ResponseScores:
    """Align score rows to token rows by sample_id and flatten the response tokens.

    Errors name the sample: a token row without scores, a length mismatch, or a NaN / inf
    score at a response token.
    """
    tokens = tokens.sort_by("sample_id")
    sids = tokens["sample_id"].to_numpy().astype(np.int64)
    score_sids = scores["sample_id"].to_numpy().astype(np.int64)
    order = np.argsort(score_sids, kind="stable")
    at = np.searchsorted(score_sids[order], sids)
    found = at < len(order)
    found[found] = score_sids[order][at[found]] == sids[found]
    if not found.all():
        raise ValueError(f"sample_id {int(sids[np.argmin(found)])} has no scores")
    aligned = scores.take(pa.array(order[at]))

    mask, tok_off = list_parts(tokens["response_mask"])
    base, base_off = list_parts(aligned["base_loss"])
    ref, _ = list_parts(aligned["ref_loss"])
    lengths, score_lengths = np.diff(tok_off), np.diff(base_off)
    if not np.array_equal(lengths, score_lengths):
        s = int(np.argmax(lengths != score_lengths))
        raise ValueError(f"sample_id {int(sids[s])}: {lengths[s]} tokens but "
                         f"{score_lengths[s]} scores")
    owner = np.repeat(np.arange(len(sids)), lengths)
    position = np.arange(mask.size, dtype=np.int64) - tok_off[owner]
    selected = (mask != 0) & (position >= 1)
    flat = token_scores(base[selected], ref[selected])
    counts = np.bincount(owner[selected], minlength=len(sids))
    offsets = np.zeros(len(sids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    check_finite(flat, offsets, sids)
    noise = None
    if "noise_mask" in tokens.column_names:
        noise_values, _ = list_parts(tokens["noise_mask"])
        noise = noise_values[selected].astype(np.int8)
    return ResponseScores(tokens, sids, offsets, flat, position[selected], selected, tok_off, noise)
