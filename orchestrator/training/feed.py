"""The job feed of a training session (training/session.py), in a module that imports
nothing heavy.

Why a module of its own: Ray imports the module of an actor's class in the actor's process.
Defined beside the session it pulled in the whole training stack (torch, transformers,
DeepSpeed: about 8 s of CPU) for an actor that only holds a list; on a 2-core machine with
three families starting their sessions at once, that was 20+ s of the reference stage's
critical path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

POLL_S = 0.2  # how often a waiting worker asks the feed, and the driver looks for results


class JobFeed:
    """The session's job list (a Ray actor, no CPU): append-only, read by index."""

    def __init__(self) -> None:
        self._jobs: list[dict[str, Any]] = []
        self._closed = False

    def put(self, job: dict[str, Any]) -> int:
        if self._closed:
            raise RuntimeError("job feed is closed")
        self._jobs.append(job)
        return len(self._jobs) - 1

    def close(self) -> None:
        self._closed = True

    def get(self, index: int) -> tuple[str, dict[str, Any] | None]:
        """("job", config) when job `index` exists, ("end", None) after close, else
        ("wait", None)."""
        if index < len(self._jobs):
            return "job", self._jobs[index]
        return ("end", None) if self._closed else ("wait", None)


def feed_jobs(feed: Any) -> Iterator[dict[str, Any]]:
    """Worker side: the feed's jobs in order, waiting for each, until the feed is closed."""
    import ray

    index = 0
    while True:
        kind, job = ray.get(feed.get.remote(index))
        if kind == "end":
            return
        if kind == "wait":
            time.sleep(POLL_S)
            continue
        yield job  # type: ignore[misc]
        index += 1
