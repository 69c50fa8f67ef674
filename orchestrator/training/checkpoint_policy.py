"""When the training loop writes a checkpoint: every N optimizer steps, and at least every
M minutes of training, so a failure never loses more than M minutes of a run.

`train.checkpoint_every` (steps, 0 = off) is exact and identical on every rank. The time
trigger is not: each rank reads its own clock, and a checkpoint is a collective (every rank
saves its shard and reports), so the ranks must agree. `due()` therefore takes an `agree`
function that reduces the local decision over the ranks (logical OR, e.g. an all-reduce MAX
of a 0/1 tensor); with one worker it is the identity.

Used by the training recipe (orchestrator/training/trainer.py) once per optimizer step:

    policy = CheckpointPolicy(train.checkpoint_every, train.checkpoint_every_minutes)
    ...
    ckpt_now = policy.due(state.step, done, agree=strategy.any_rank)
    if ckpt_now:
        ... save + report ...
        policy.saved()
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CheckpointPolicy:
    def __init__(self, every_steps: int = 0, every_minutes: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_steps < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {every_steps}")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"train.checkpoint_every_minutes must be > 0, got {every_minutes}")
        self.every_steps = every_steps
        self.every_s = None if every_minutes is None else every_minutes * 60.0
        self.clock = clock
        self.last = clock()

    def time_due(self) -> bool:
        """This rank's view: has the time budget since the last checkpoint run out?"""
        return self.every_s is not None and self.clock() - self.last >= self.every_s

    def due(self, step: int, done: bool = False,
            agree: Callable[[bool], bool] | None = None) -> bool:
        """True when a checkpoint is due after optimizer step `step` (1-based). Every rank
        must call this at every step (the time decision is a collective through `agree`)."""
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        by_time = self.time_due()
        if agree is not None and self.every_s is not None:
            by_time = agree(by_time)
        return done or by_steps or by_time

    def saved(self) -> None:
        """Call after a checkpoint was written: the time budget starts again."""
        self.last = self.clock()
