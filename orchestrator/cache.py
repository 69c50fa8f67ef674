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
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import LetheError

SUCCESS = "_SUCCESS.json"
LOCK_TIMEOUT_ENV = "LETHE_STAGE_LOCK_TIMEOUT"  # seconds; unset = wait as long as it takes
_WAIT_MESSAGE_EVERY_S = 300.0
_POLL_S = 0.2
# `_<name>.<pid>.<8 hex>.tmp`: "_" hides it from Parquet dataset readers; pid + random
# part make concurrent writers of one file never share a temporary name. The pattern also
# matches `_<name>.<uuid hex>.tmp` (writers that draw a uuid instead).
_TEMP_NAME = re.compile(r"^_.+\.(\d+\.)?[0-9a-f]{8,32}\.tmp$")
# Names the writers used before atomic_path (still found in folders of older runs).
_LEGACY_TEMP = re.compile(r"\.(json|parquet|jsonl|txt)\.tmp$")


class StageLockTimeout(LetheError):
    """Another run held a stage's lock for longer than the allowed wait."""


# ----------------------------------------------------------------------------- hashing


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


def read_summary(stage_dir: str | Path) -> dict[str, Any]:
    """What a finished stage recorded: its `_SUCCESS.json` (the one reader of it)."""
    return dict(json.loads((Path(stage_dir) / SUCCESS).read_text()))


# ----------------------------------------------------------------------------- atomic writes


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


# ----------------------------------------------------------------------------- locks


@dataclass
class _Held:
    fd: int
    thread: int


_HELD: dict[str, _Held] = {}
_HELD_LOCK = threading.Lock()


def _lock_timeout() -> float | None:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise LetheError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


class StageLock:
    """An exclusive lock on one stage: `flock` between processes, thread-aware within one.

    Re-entrant for the thread that holds it. A lock whose holding thread has died (a failed
    worker thread of this process) is taken over, since flock would otherwise keep it
    until the process exits.
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path = Path(path)
        self.label = label

    def _try_local(self) -> bool | None:
        """True: this thread holds it now; False: another live thread here holds it;
        None: no thread of this process holds it."""
        me = threading.get_ident()
        with _HELD_LOCK:
            held = _HELD.get(str(self.path))
            if held is None:
                return None
            alive = {t.ident for t in threading.enumerate()}
            if held.thread == me or held.thread not in alive:
                held.thread = me
                return True
            return False

    def acquire(self, timeout: float | None = None) -> None:
        timeout = _lock_timeout() if timeout is None else timeout
        start = time.monotonic()
        next_message = start
        fd: int | None = None
        try:
            while True:
                local = self._try_local()
                if local:
                    return
                if local is None:
                    if fd is None:
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pass
                    else:
                        with _HELD_LOCK:
                            _HELD[str(self.path)] = _Held(fd, threading.get_ident())
                        self._write_holder(fd)
                        fd = None
                        return
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise StageLockTimeout(
                        f"{self.label}: another run ({self.holder()}) has been computing it for "
                        f"more than {timeout:.0f} s; wait for it to finish, or raise "
                        f"{LOCK_TIMEOUT_ENV}")
                if time.monotonic() >= next_message:
                    limit = f"up to {timeout:.0f} s" if timeout is not None else "until it is done"
                    print(f"[lethe] {self.label}: another run ({self.holder()}) is computing it; "
                          f"waiting {limit}", flush=True)
                    next_message = time.monotonic() + _WAIT_MESSAGE_EVERY_S
                time.sleep(_POLL_S)
        finally:
            if fd is not None:
                os.close(fd)

    def _write_holder(self, fd: int) -> None:
        body = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, body.encode(), 0)
        except OSError:  # the holder note is informational only
            pass

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def release(self) -> None:
        with _HELD_LOCK:
            held = _HELD.pop(str(self.path), None)
        if held is not None:
            fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)

    def held_here(self) -> bool:
        with _HELD_LOCK:
            return str(self.path) in _HELD


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
