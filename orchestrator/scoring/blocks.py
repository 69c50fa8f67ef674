"""Fixed, deterministic blocks of the corpus (the scoring stage's unit of resume).

Block b holds the rows whose sample_id ranks in [b * block_rows, (b + 1) * block_rows) of the
sorted sample_ids. The plan is recorded in `_plan.json`; a directory whose part files were
written under another plan (other rows, other block size) has them removed, never mixed.

Reading a block (`CorpusLayout`, `BlockRead`): a block is scored and written whole by one
actor, which reads its rows itself, so no scored row passes through the driver. The driver
only knows the sample_id column and the Parquet metadata, from which it derives, per block,
the row groups that hold its rows. When that would decode much more than the corpus (one big
row group, or rows not stored in sample_id order: every block would decode every row group),
a staging pass first splits the input once into per-block piece files (`stage_pieces`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.cache import (
    atomic_write_json,
    clean_stale_temps,
    parquet_problem,
    validate_parquet,
)

# Leading "_": pyarrow.dataset and Ray skip it when the folder is read as a Parquet dataset.
PLAN_FILE = "_plan.json"
STAGING_DIR = "_inputs"
INPUT_COLUMNS = ["sample_id", "input_ids", "response_mask"]
# Reading blocks straight from the input may decode this many bytes beyond one pass over it
# (a row group shared by k blocks is decoded k times) before a staging pass is cheaper.
DIRECT_READ_MAX_EXTRA_BYTES = 512 * 2**20


def part_path(out_dir: Path, block: int) -> Path:
    return Path(out_dir) / f"part-{block:05d}.parquet"


def score_files(path: Path) -> list[Path]:
    """The score part files of a scoring output directory (or the file itself), in block order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"scores not found: {path}")
    return sorted(path.glob("part-*.parquet"))


@dataclass(frozen=True)
class BlockPlan:
    block_rows: int
    starts: np.ndarray  # first (smallest) sample_id of each block
    sizes: np.ndarray  # rows per block
    digest: str  # hash of the sorted sample_ids and block_rows

    @classmethod
    def create(cls, sample_ids: np.ndarray, block_rows: int) -> BlockPlan:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
        dup = ids[1:][ids[1:] == ids[:-1]]
        if dup.size:
            raise ValueError(f"tokens: sample_id {int(dup[0])} appears more than once")
        starts = ids[::block_rows].copy()
        sizes = np.diff(np.append(np.arange(0, len(ids), block_rows), len(ids)))
        digest = hashlib.sha256(ids.tobytes() + str(block_rows).encode()).hexdigest()[:16]
        return cls(block_rows, starts, sizes, digest)

    @property
    def num_blocks(self) -> int:
        return len(self.starts)

    def block_of(self, sample_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, np.asarray(sample_ids), side="right") - 1

    def block_size(self, block: int) -> int:
        return int(self.sizes[block])

    def read(self, block: int, sources: tuple) -> BlockRead:
        hi = int(self.starts[block + 1]) if block + 1 < self.num_blocks else None
        return BlockRead(block, self.block_size(block), int(self.starts[block]), hi, sources)

    def reconcile(self, out_dir: Path) -> None:
        """Record this plan in out_dir; drop part files written under a different plan."""
        plan_file = Path(out_dir) / PLAN_FILE
        body = {"block_rows": self.block_rows, "num_blocks": self.num_blocks, "digest": self.digest}
        if plan_file.is_file() and json.loads(plan_file.read_text()) == body:
            self.drop_invalid_parts(out_dir)
            return
        stale = score_files(out_dir)
        if stale:
            print(f"scoring: {len(stale)} part files in {out_dir} were written under another block "
                  f"plan; recomputing them")
            for p in stale:
                p.unlink()
        atomic_write_json(plan_file, body)

    # ------------------------------------------------------------------ fault handling (H6)
    def drop_invalid_parts(self, out_dir: Path) -> list[int]:
        """A part file counts as done only when its Parquet footer reads back with this
        plan's row count: a truncated or foreign file (a killed writer, a disk that filled
        up, a copy gone wrong) is removed, so the block is recomputed instead of failing
        every later read. Temporary files of killed writers are removed too."""
        clean_stale_temps(out_dir)
        dropped = []
        for b in range(self.num_blocks):
            path = part_path(out_dir, b)
            if path.exists() and not validate_parquet(path, self.block_size(b)):
                print(f"scoring: {path.name} is invalid ({parquet_problem(path, self.block_size(b))}); "
                      f"recomputing block {b}")
                path.unlink()
                dropped.append(b)
        return dropped


def token_files(tokens_path: Path) -> list[Path]:
    """The Parquet files of a tokens path (one file, or a folder's visible *.parquet files)."""
    path = Path(tokens_path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"tokens: no Parquet file at {path}")
    return files


@dataclass(frozen=True)
class BlockRead:
    """What an actor reads to get block `block`: rows with lo <= sample_id < hi from `sources`."""

    block: int
    rows: int  # rows the block must have (checked by the reader)
    lo: int
    hi: int | None  # None: the last block
    sources: tuple[tuple[str, tuple[int, ...] | None], ...]  # (file, row groups; None = all)


@dataclass(frozen=True)
class CorpusLayout:
    """Where every row of the tokens input lives: file and row group, in storage order."""

    files: list[str]
    sample_ids: np.ndarray  # int64, storage order (files in order, rows in order)
    group_file: np.ndarray  # per global row group: index into files
    group_local: np.ndarray  # per global row group: row group number inside its file
    group_rows: np.ndarray  # per global row group: rows
    group_bytes: np.ndarray  # per global row group: uncompressed bytes

    @classmethod
    def read(cls, tokens_path: Path) -> CorpusLayout:
        files, ids, gf, gl, gr, gb = [], [], [], [], [], []
        for path in token_files(tokens_path):
            pf = pq.ParquetFile(path)
            md = pf.metadata
            for g in range(md.num_row_groups):
                gf.append(len(files))
                gl.append(g)
                gr.append(md.row_group(g).num_rows)
                gb.append(md.row_group(g).total_byte_size)
            ids.append(pf.read(columns=["sample_id"])["sample_id"].to_numpy().astype(np.int64))
            files.append(str(path))
        as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        return cls(files, np.concatenate(ids) if ids else np.zeros(0, np.int64),
                   as_int(gf), as_int(gl), as_int(gr), as_int(gb))

    def direct_reads(self, plan: BlockPlan, blocks: list[int]) -> tuple[list[BlockRead], int]:
        """Per-block reads straight from the input, and the bytes they decode in all."""
        group_of_row = np.repeat(np.arange(len(self.group_rows), dtype=np.int32), self.group_rows)
        order = np.argsort(self.sample_ids, kind="stable")
        reads, decoded = [], 0
        for b in blocks:
            first = b * plan.block_rows
            groups = np.unique(group_of_row[order[first : first + plan.block_size(b)]])
            decoded += int(self.group_bytes[groups].sum())
            by_file: dict[int, list[int]] = {}
            for g in groups:
                by_file.setdefault(int(self.group_file[g]), []).append(int(self.group_local[g]))
            sources = tuple((self.files[f], tuple(gs)) for f, gs in sorted(by_file.items()))
            reads.append(plan.read(b, sources))
        return reads, decoded

    def group_sources(self) -> list[tuple[str, int]]:
        return [(self.files[f], int(g)) for f, g in zip(self.group_file, self.group_local, strict=True)]


def read_block(spec: BlockRead, columns: list[str] = INPUT_COLUMNS) -> pa.Table:
    """The rows of one block, sorted by sample_id; raises if any row is missing or extra."""
    parts = []
    for path, groups in spec.sources:
        pf = pq.ParquetFile(path)
        table = pf.read(columns=columns) if groups is None else pf.read_row_groups(list(groups), columns=columns)
        sids = table["sample_id"]
        keep = pc.greater_equal(sids, spec.lo)
        if spec.hi is not None:
            keep = pc.and_(keep, pc.less(sids, spec.hi))
        parts.append(table.filter(keep))
    table = pa.concat_tables(parts).sort_by("sample_id") if parts else None
    if table is None or table.num_rows != spec.rows:
        got = 0 if table is None else table.num_rows
        raise RuntimeError(f"scoring block {spec.block}: read {got} rows from {len(spec.sources)} "
                           f"source(s), expected {spec.rows} (did the tokens input change?)")
    return table


def stage_pieces(path: str, group: int, starts: np.ndarray, wanted: np.ndarray, staging: str,
                 tag: str, batch_rows: int = 65536) -> dict[int, list[str]]:
    """Split one row group into per-block piece files `staging/block-<b>/<tag>-<k>.parquet`.

    Streams the row group in batches (memory ~ one batch), so one pass over the input gives
    every block its own small files. Returns {block: [piece paths]} for the wanted blocks.
    """
    out: dict[int, list[str]] = {}
    pf = pq.ParquetFile(path)
    for k, batch in enumerate(pf.iter_batches(batch_size=batch_rows, row_groups=[group],
                                              columns=INPUT_COLUMNS)):
        table = pa.Table.from_batches([batch])
        blocks = np.searchsorted(starts, table["sample_id"].to_numpy(), side="right") - 1
        for b in np.intersect1d(np.unique(blocks), wanted):
            piece = Path(staging) / f"block-{int(b):05d}" / f"{tag}-{k:05d}.parquet"
            piece.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(pa.array(blocks == b)), piece)
            out.setdefault(int(b), []).append(str(piece))
    return out
