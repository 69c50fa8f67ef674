"""The part files of a scoring output folder, and what a rerun still has to score.

The scoring stage writes its scores with Ray Data's `write_parquet`: one `part-*.parquet`
file per write task, each holding whichever rows that task scored (not a fixed range of
sample_ids). What is done is therefore read back from the files themselves: a rerun reads
the `sample_id` column of every readable part file and scores only the rows that are in
none of them (`ScoredParts`).

A part file counts only when its Parquet footer reads back: a writer killed mid-file
leaves a file without one, which is removed (its rows are scored again). The corpus the
parts were written for is recorded in `_corpus.json` (a hash of its sorted sample_ids); a
folder written for other rows has its parts removed, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from orchestrator.cache import atomic_write_json, clean_stale_temps, parquet_problem

# Leading "_": pyarrow.dataset and Ray skip it when the folder is read as a Parquet dataset.
CORPUS_FILE = "_corpus.json"
INPUT_COLUMNS = ["sample_id", "input_ids", "response_mask"]
PART_PREFIX = "part-"


def score_files(path: Path) -> list[Path]:
    """The score part files of a scoring output directory (or the file itself), by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"scores not found: {path}")
    return sorted(path.glob(f"{PART_PREFIX}*.parquet"))


def token_files(tokens_path: Path) -> list[Path]:
    """The Parquet files of a tokens path (one file, or a folder's visible *.parquet files)."""
    path = Path(tokens_path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"tokens: no Parquet file at {path}")
    return files


def corpus_sample_ids(tokens_path: Path) -> np.ndarray:
    """Every sample_id of the tokens input (int64, storage order); the column only."""
    ids = [pq.read_table(p, columns=["sample_id"])["sample_id"].to_numpy().astype(np.int64)
           for p in token_files(tokens_path)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def corpus_digest(sample_ids: np.ndarray) -> str:
    """A hash of the sorted sample_ids; raises on a duplicate id (scores are keyed by it)."""
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.size:
        raise ValueError(f"tokens: sample_id {int(dup[0])} appears more than once")
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ScoredParts:
    """The readable part files of a scoring folder and the sample_ids they hold."""

    files: list[Path]
    sample_ids: np.ndarray  # int64, sorted, unique

    @classmethod
    def reconcile(cls, out_dir: Path, corpus_ids: np.ndarray) -> ScoredParts:
        """Record the corpus in out_dir; drop parts written for another corpus, unreadable
        parts and killed writers' temp files; return what the remaining parts hold.

        Call only while holding the stage's lock (a live writer's file is not stale)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out_dir)
        body = {"digest": corpus_digest(corpus_ids), "rows": int(len(corpus_ids))}
        record = out_dir / CORPUS_FILE
        if not record.is_file() or json.loads(record.read_text()) != body:
            stale = score_files(out_dir)
            if stale:
                print(f"scoring: {len(stale)} part files in {out_dir} were written for another "
                      f"corpus; scoring it again")
            for p in stale:
                p.unlink()
            atomic_write_json(record, body)
        files, ids = [], []
        for path in score_files(out_dir):
            problem = parquet_problem(path)
            if problem is not None:
                print(f"scoring: {path.name} is invalid ({problem}); its rows are scored again")
                path.unlink()
                continue
            files.append(path)
            ids.append(pq.read_table(path, columns=["sample_id"])["sample_id"].to_numpy())
        done = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
        unique = np.unique(done)
        if unique.size != done.size:
            # A retried write task rewrites its own file name, so a row is never in two
            # files unless something outside the stage copied files in.
            dup = np.sort(done)
            dup = dup[1:][dup[1:] == dup[:-1]]
            raise RuntimeError(f"scoring: sample_id {int(dup[0])} is in more than one part file "
                               f"of {out_dir}; remove the folder to score again")
        foreign = np.setdiff1d(unique, corpus_ids)
        if foreign.size:
            raise RuntimeError(f"scoring: {out_dir} holds sample_id {int(foreign[0])}, which is "
                               f"not in the tokens input; remove the folder to score again")
        return cls(files, unique)
