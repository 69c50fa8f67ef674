"""Schedules for lambda, the weight of the negative (forgetting) term.

The paper (Taheri et al., TMLR 2026, arXiv 2508.04329) grows lambda with training progress,
so forgetting starts gently, from t_max = 0.25 and t_min = 1e-5 in its released code.

"linear" reproduces the paper's released code exactly: lambda = (t_max - t_min) * step /
total_steps, a ramp that starts at 0 at step 0 (t_min only sets the slope; it is not an
offset) and is not clamped past total_steps. Pure Python (method core).
"""

from __future__ import annotations

import math

from orchestrator.names import SCHEDULES


def lambda_at(
    step: int,
    total_steps: int,
    schedule: str = "linear",
    t_max: float = 0.25,
    t_min: float = 1e-5,
) -> float:
    """lambda at optimizer step `step` (0-based) of `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lambda schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule == "constant":
        return float(t_max)
    if schedule == "linear":
        return (t_max - t_min) * step / total_steps
    return t_min + (t_max - t_min) * (1.0 - math.cos(math.pi * step / total_steps)) / 2.0
