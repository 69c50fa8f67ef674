"""The exclusive lock on one stage folder, between processes and between threads.

Two processes (`lethe tune` and `lethe run` on one config share stages) must never write one
stage folder at once: `StageLock` takes an exclusive `flock` on the stage's lock file,
`<root>/<stage>/.<key>.lock`. A process that dies releases its lock with its file
descriptors, so a killed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import LetheError

LOCK_TIMEOUT_ENV = "LETHE_STAGE_LOCK_TIMEOUT"  # seconds; unset = wait as long as it takes
_WAIT_MESSAGE_EVERY_S = 300.0
_POLL_S = 0.2


class StageLockTimeout(LetheError):
    """Another run held a stage's lock for longer than the allowed wait."""


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
