"""What the benchmarks share: a measurement in a fresh spawned process (its own peak memory),
and the peak RSS of this process while a block runs."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections.abc import Callable
from typing import Any


def in_child(fn: Callable[..., None], *args: Any, what: str | None = None) -> Any:
    """Run `fn(*args, queue)` in a spawned process and return what it put on the queue;
    exits with a message naming `what` (default: the function) when the child fails."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*args, q))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{what or fn.__name__} failed (exit code {proc.exitcode})")
    return q.get()


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS of this process inside `with` (`start`, `peak` in bytes), sampled every
    `interval` seconds by a thread."""

    rss = staticmethod(rss)

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start = self.peak = 0

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
