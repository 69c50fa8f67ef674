"""Fixed, deterministic blocks of the corpus (the scoring stage's unit of resume).

Block b holds the rows whose sample_id ranks in [b * block_rows, (b + 1) * block_rows) of the
sorted sample_ids. The plan is recorded in `_plan.json`; a directory whose part files were
written under another plan (other rows, other block size) has them removed, never mixed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.cache import (
    atomic_write_json,
    clean_stale_temps,
    parquet_problem,
    validate_parquet,
)

# Leading "_": pyarrow.dataset and Ray skip it when the folder is read as a Parquet dataset.
PLAN_FILE = "_plan.json"


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
