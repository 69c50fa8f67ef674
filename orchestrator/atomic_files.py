"""Atomic file writes, the clean-up of what killed writers left, and Parquet footer checks.

Every file of a stage is written through `atomic_path`: a unique temporary name in the same
folder, fsync, rename, fsync of the folder, so a reader never sees half a file; a temporary
file left by a killed run is removed when its stage is next opened (`clean_stale_temps`,
called by orchestrator/cache.py's `Stage.prepare` under the stage's lock).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# `_<name>.<pid>.<8 hex>.tmp`: "_" hides it from Parquet dataset readers; pid + random
# part make concurrent writers of one file never share a temporary name. The pattern also
# matches `_<name>.<uuid hex>.tmp` (writers that draw a uuid instead).
_TEMP_NAME = re.compile(r"^_.+\.(\d+\.)?[0-9a-f]{8,32}\.tmp$")
# Names the writers used before atomic_path (still found in folders of older runs).
_LEGACY_TEMP = re.compile(r"\.(json|parquet|jsonl|txt)\.tmp$")


def temp_path(path: str | Path) -> Path:
    """A temporary name beside `path`, unique per process and call."""
    p = Path(path)
    return p.with_name(f"_{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still holds
        pass
    finally:
        os.close(fd)


def commit_temp(tmp: str | Path, final: str | Path) -> None:
    """Make a finished temporary file the real one: fsync its bytes, rename, fsync the folder
    (for writers that stream into `temp_path(final)` themselves)."""
    with Path(tmp).open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(Path(final).parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed onto `path`.

    On any error (a full disk included) the temporary file is removed and the error is
    re-raised naming `path`, so the next run finds nothing half-written to clean up.
    """
    final = Path(path)
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        commit_temp(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and str(final) not in str(exc):
            code = exc.errno if exc.errno is not None else _errno_from_text(str(exc))
            raise OSError(code, f"{exc.strerror or exc} (writing {final})") from exc
        raise


def _errno_from_text(text: str) -> int:
    # pyarrow raises OSError without errno ("... [errno 28] No space left on device").
    m = re.search(r"errno (\d+)", text)
    return int(m.group(1)) if m else errno.EIO


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps_kwargs: Any) -> None:
    """JSON (indent 2, `default=str` unless given) written atomically."""
    dumps_kwargs.setdefault("indent", 2)
    dumps_kwargs.setdefault("default", str)
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def atomic_write_parquet(table: Any, path: str | Path) -> None:
    """A pyarrow Table written as Parquet atomically (the "_"-prefixed temp name is hidden
    from dataset readers)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temporary files that killed writers left in `directory` (recursively).
    Call only while holding the directory's stage lock: a live writer's file is not stale."""
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.rglob("*.tmp"):
        if p.is_file() and (_TEMP_NAME.match(p.name) or _LEGACY_TEMP.search(p.name)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- validation


def parquet_problem(path: str | Path, expected_rows: int | None = None) -> str | None:
    """None when `path` is a readable Parquet file (footer intact, `expected_rows` rows
    when given); otherwise why not. Reads only the footer, never the data pages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        meta = pq.ParquetFile(p).metadata
    except (pa.ArrowException, OSError) as exc:
        return f"unreadable footer ({exc})"
    if expected_rows is not None and meta.num_rows != expected_rows:
        return f"{meta.num_rows} rows, expected {expected_rows}"
    return None


def validate_parquet(path: str | Path, expected_rows: int | None = None) -> bool:
    """True when the Parquet file's footer is readable and it has `expected_rows` rows."""
    return parquet_problem(path, expected_rows) is None
