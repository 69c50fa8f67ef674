"""Content-addressed stage directories, their locks, and atomic file writes.

A stage's output directory is named by a hash of everything that determines its result
(upstream stage keys, the config section it uses, input file contents). A stage is done
when its `_SUCCESS.json` marker exists; the marker is written last, so a killed stage is
recomputed (or resumed block by block, where the stage supports it) on the next run.
Layout: `<root>/<stage>/<key>/{inputs.json, _SUCCESS.json, ...outputs}`, with the lock file
`<root>/<stage>/.<key>.lock` beside the folder.

Concurrency: two processes (`lethe tune` and `lethe run` on one config share stages) must
never write one stage folder at once. `Stage.open()` takes an exclusive `flock` on the
stage's lock file before computing, re-checks the marker once it holds the lock (the other
run may have finished the stage meanwhile: then nothing is computed twice) and keeps the
lock until `mark_done`. A process that dies releases its lock with its file descriptors, so
a killed run never blocks the next one. Every file is written through `atomic_path`: a
unique temporary name in the same folder, fsync, rename, fsync of the folder; a temporary
file left by a killed run is removed when the stage is next opened.

The parts live in their own modules and are re-exported here (the import path callers use):
content hashes in orchestrator/hashing.py, atomic writes and Parquet checks in
orchestrator/atomic_files.py, the lock in orchestrator/stage_lock.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.atomic_files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    clean_stale_temps,
    commit_temp,
    parquet_problem,
    temp_path,
    validate_parquet,
)
from orchestrator.hashing import content_hash, file_sha256, path_fingerprint
from orchestrator.stage_lock import LOCK_TIMEOUT_ENV, StageLock, StageLockTimeout

__all__ = [
    "LOCK_TIMEOUT_ENV", "SUCCESS", "Stage", "StageLock", "StageLockTimeout", "atomic_path",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_parquet", "atomic_write_text",
    "clean_stale_temps", "commit_temp", "content_hash", "file_sha256", "parquet_problem",
    "path_fingerprint", "read_summary", "temp_path", "validate_parquet",
]

SUCCESS = "_SUCCESS.json"


def read_summary(stage_dir: str | Path) -> dict[str, Any]:
    """What a finished stage recorded: its `_SUCCESS.json` (the one reader of it)."""
    return dict(json.loads((Path(stage_dir) / SUCCESS).read_text()))


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    root: Path
    name: str
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return content_hash(self.inputs)

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name / self.key

    @property
    def lock(self) -> StageLock:
        return StageLock(Path(self.root) / self.name / f".{self.key}.lock",
                         f"stage {self.name} {self.key}")

    def done(self) -> bool:
        return (self.dir / SUCCESS).is_file()

    def open(self, timeout: float | None = None) -> bool:
        """True when the stage is done (maybe by another run while this one waited);
        otherwise lock it for this run, prepare the folder and return False. The lock is
        released by `mark_done` (or `release`, or the process's exit)."""
        if self.done():
            return True
        self.lock.acquire(timeout)
        if self.done():
            self.lock.release()
            return True
        self.prepare()
        return False

    def prepare(self) -> Path:
        """Lock the stage (waiting for another run that holds it), create the directory,
        remove temporary files a killed run left, and record the inputs that name it."""
        self.lock.acquire()
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = clean_stale_temps(self.dir)
        if stale:
            print(f"[lethe] stage {self.name} {self.key}: removed {len(stale)} temporary "
                  f"file(s) left by an interrupted run", flush=True)
        atomic_write_json(self.dir / "inputs.json", self.inputs, sort_keys=True)
        return self.dir

    def mark_done(self, summary: dict[str, Any] | None = None) -> None:
        body = {"stage": self.name, "key": self.key, "finished_at": time.time(), **(summary or {})}
        atomic_write_json(self.dir / SUCCESS, body)
        self.release()

    def release(self) -> None:
        """Give up the lock without marking the stage done (its computation failed)."""
        self.lock.release()

    def summary(self) -> dict[str, Any]:
        return read_summary(self.dir)
