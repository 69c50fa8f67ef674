"""The checkpoint trigger: every N steps and at least every M minutes, agreed by all ranks."""

from __future__ import annotations

import pytest

from orchestrator.config import TrainConfig
from orchestrator.training.checkpoint_policy import CheckpointPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_steps_and_minutes_both_trigger_and_saving_resets_the_timer():
    clock = Clock()
    policy = CheckpointPolicy(every_steps=10, every_minutes=2.0, clock=clock)
    assert not policy.due(1)
    assert policy.due(10)  # by steps
    clock.t = 119.0
    assert not policy.due(11)
    clock.t = 120.0
    assert policy.due(12)  # two minutes since the start
    policy.saved()
    clock.t = 200.0
    assert not policy.due(13)
    assert policy.due(14, done=True)  # the end always checkpoints


def test_time_decision_is_agreed_across_ranks():
    clock = Clock()
    policy = CheckpointPolicy(every_steps=0, every_minutes=1.0, clock=clock)
    seen = []

    def any_rank(local: bool) -> bool:  # another rank's clock has passed the budget
        seen.append(local)
        return True

    assert policy.due(3, agree=any_rank) and seen == [False]
    assert not CheckpointPolicy(0, None, clock=clock).due(3, agree=any_rank)  # time off: no vote


def test_config_default_and_validation():
    assert TrainConfig().checkpoint_every_minutes == 30.0
    with pytest.raises(ValueError):
        CheckpointPolicy(every_minutes=0)
    with pytest.raises(ValueError):
        CheckpointPolicy(every_steps=-1)
