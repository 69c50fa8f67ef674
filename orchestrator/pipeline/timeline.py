"""Where a pipeline run's wall time goes: a timeline of spans, printed and logged at the end.

Every span is (stage, model, category, start, end) in wall-clock seconds. The driver records
the stages it runs (`span`); the training workers time their own start-up, training loop and
export, and those spans are added from each job's metrics (`add_training`). Categories:

    startup     process / actor / worker-group start-up, model loads, engine set-up
    data        data generation, tokenizing, partitioning
    compute     model forward / backward work (training loop, scoring, evaluation)
    export      writing models and checkpoints
    stage       a driver-side stage whose inside is not broken down

The headline is the share of the wall time during which no model compute ran anywhere
(`overhead_fraction` = 1 - |union of compute spans| / wall): with several families in
flight at once, summing per-stage times would count parallel work twice.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.cache import atomic_write_json

CATEGORIES = ("startup", "data", "compute", "export", "stage")


@dataclass(frozen=True)
class Span:
    stage: str
    model: str
    category: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


class Timeline:
    """Thread-safe span recorder (model chains run in threads)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.time() if start is None else start
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def add(self, stage: str, model: str, category: str, start: float, end: float) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"timeline category {category!r} not in {CATEGORIES}")
        with self._lock:
            self.spans.append(Span(stage, model, category, float(start), float(end)))

    @contextlib.contextmanager
    def span(self, stage: str, model: str = "-", category: str = "stage",
             announce: bool = True) -> Iterator[None]:
        """Time a block; with `announce`, print one line when it ends (done / failed)."""
        from orchestrator.logs import stage_event

        t0, event = time.time(), "failed"
        try:
            yield
            event = "done"
        finally:
            t1 = time.time()
            self.add(stage, model, category, t0, t1)
            if announce:
                stage_event(stage, model, event, t1 - t0)

    def add_training(self, stage: str, model: str, metrics: dict[str, Any]) -> None:
        """Spans a training job timed inside its worker (see training/trainer.py `timing`):
        worker-group start-up (first job of a run only), load + engine set-up, the training
        loop (compute), the export."""
        t = metrics.get("timing") or {}
        if not {"start", "ready", "trained"} <= t.keys():
            return
        run_start = metrics.get("run_started_at")
        if run_start is not None and run_start < t["start"] and metrics.get("run_first_job"):
            self.add(stage, model, "startup", run_start, t["start"])
        self.add(stage, model, "startup", t["start"], t["ready"])
        self.add(stage, model, "compute", t["ready"], t["trained"])
        if "end" in t:
            self.add(stage, model, "export", t["trained"], t["end"])

    def add_scoring(self, stage: str, model: str, start: float, summary: dict[str, Any]) -> None:
        """Spans of a scoring run from its summary's `timings` (orchestrator/scoring/stage.py):
        actor pool start-up (processes, imports, two model loads), then the actors' scoring."""
        t = summary.get("timings") or {}
        end = summary.get("finished_at")
        if end is None or "actors_ready_s" not in t or "score_wall_s" not in t:
            return
        self.add(stage, model, "startup", start, start + t["actors_ready_s"])
        compute_start = end - t["score_wall_s"]
        self.add(stage, model, "compute", compute_start,
                 compute_start + t.get("actor_score_s", t["score_wall_s"]))

    def summary(self, end: float | None = None) -> dict[str, Any]:
        end = time.time() if end is None else end
        wall = max(1e-9, end - self.start)
        compute = union_seconds([(s.start, s.end) for s in self.spans if s.category == "compute"])
        by_stage: dict[str, dict[str, float]] = {}
        for s in self.spans:
            row = by_stage.setdefault(s.stage, {"first_start": s.start - self.start,
                                                "last_end": s.end - self.start})
            row["first_start"] = min(row["first_start"], s.start - self.start)
            row["last_end"] = max(row["last_end"], s.end - self.start)
            row[s.category] = row.get(s.category, 0.0) + s.seconds
        return {"wall_seconds": wall, "compute_seconds": compute,
                "overhead_fraction": 1.0 - compute / wall, "stages": by_stage}

    def text(self, end: float | None = None) -> str:
        summ = self.summary(end)
        lines = ["stage timeline (seconds from start; per-category seconds summed over models):",
                 f"  {'stage':<12}{'from':>7}{'to':>7}  " + "".join(f"{c:>9}" for c in CATEGORIES)]
        for stage, row in sorted(summ["stages"].items(), key=lambda kv: kv[1]["first_start"]):
            cats = "".join(f"{row.get(c, 0.0):9.1f}" for c in CATEGORIES)
            lines.append(f"  {stage:<12}{row['first_start']:7.1f}{row['last_end']:7.1f}  {cats}")
        lines.append(f"  wall {summ['wall_seconds']:.1f} s; model compute running "
                     f"{summ['compute_seconds']:.1f} s; non-compute overhead "
                     f"{100 * summ['overhead_fraction']:.0f} % of wall time")
        return "\n".join(lines)

    def write(self, path: Path, end: float | None = None) -> None:
        body = {"start": self.start, "summary": self.summary(end),
                "spans": [asdict(s) for s in self.spans]}
        atomic_write_json(path, body, indent=1)


_current: Timeline | None = None


def current() -> Timeline:
    """The running pipeline's timeline (a throwaway one outside a pipeline run)."""
    return _current if _current is not None else Timeline()


def begin(start: float | None = None) -> Timeline:
    global _current
    _current = Timeline(start)
    return _current
