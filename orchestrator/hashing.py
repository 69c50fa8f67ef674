"""Content hashes: of JSON-able objects (stage keys) and of files and folders (inputs).

A stage's key (orchestrator/cache.py) hashes everything that determines its result; local
inputs enter it by content (`path_fingerprint`), never by location, so a copy of the same
data elsewhere reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def content_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object; key order does not matter."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


_FILE_HASHES: dict[tuple[str, int, int, int, int], str] = {}
_FILE_HASHES_LOCK = threading.Lock()
_DISK_MEMO_MIN_BYTES = 64 << 20  # smaller files hash faster than a memo look-up is worth
_disk_memo_loaded = False


def _disk_memo_path() -> Path | None:
    """LETHE_HASH_MEMO (a file, or "off"); default ~/.cache/lethe/sha256.jsonl."""
    raw = os.environ.get("LETHE_HASH_MEMO", "").strip()
    if raw.lower() == "off":
        return None
    if raw:
        return Path(raw)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lethe" / "sha256.jsonl"


def _load_disk_memo() -> None:
    global _disk_memo_loaded
    _disk_memo_loaded = True
    path = _disk_memo_path()
    if path is None or not path.is_file():
        return
    for line in path.read_text(errors="replace").splitlines():
        try:
            key, digest = json.loads(line)
            _FILE_HASHES[tuple(key)] = digest  # type: ignore[index]
        except (ValueError, TypeError):
            continue  # a torn line of a killed writer: ignored


def _save_disk_memo(key: tuple[str, int, int, int, int], digest: str) -> None:
    path = _disk_memo_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:  # one short append: atomic enough, torn lines are skipped
            fh.write(json.dumps([list(key), digest]) + "\n")
    except OSError:
        pass  # a read-only home: the memo is an optimisation only


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (path, inode, size, mtime_ns, ctime_ns).

    ctime cannot be set back by tools such as `touch -d` or `cp -p`, so any rewrite of the
    file misses the memo; a whole-second mtime alone misses rewrites within one second.
    Files of 64 MiB and more (model weights) are also memoised on disk, so a pipeline start
    does not re-read a multi-GB local model it has hashed before.
    """
    p = Path(path)
    st = p.stat()
    memo_key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    big = st.st_size >= _DISK_MEMO_MIN_BYTES
    with _FILE_HASHES_LOCK:
        if big and not _disk_memo_loaded:
            _load_disk_memo()
        if memo_key in _FILE_HASHES:
            return _FILE_HASHES[memo_key]
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _FILE_HASHES_LOCK:
        _FILE_HASHES[memo_key] = digest
        if big:
            _save_disk_memo(memo_key, digest)
    return digest


def path_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of a local file or directory by content: the sha256 of every file (names
    relative to the directory). The location is not part of it, so a copy of the same data
    elsewhere reuses the cache; each file is hashed once per process (see file_sha256)."""
    p = Path(path)
    if not p.exists():
        return {"path": str(path), "missing": True}
    if p.is_file():
        return {"name": p.name, "sha256": file_sha256(p)}
    files = sorted(q for q in p.rglob("*") if q.is_file())
    entries = [(str(q.relative_to(p)), file_sha256(q)) for q in files]
    return {"name": p.name, "files": len(entries), "sha256": content_hash(entries, length=64)}
