"""lambda_at: exact values of the paper's linear ramp, constant and cosine; errors."""

from __future__ import annotations

import math

import pytest

from orchestrator.method.schedules import lambda_at


def test_linear_is_the_paper_ramp_from_zero():
    assert lambda_at(0, 100) == 0.0
    assert lambda_at(50, 100) == (0.25 - 1e-5) * 50 / 100
    assert lambda_at(100, 100) == 0.25 - 1e-5
    assert lambda_at(3, 4, "linear", t_max=1.0, t_min=0.0) == 0.75
    # Not clamped past the end (the paper's code is not either).
    assert lambda_at(8, 4, "linear", t_max=1.0, t_min=0.0) == 2.0


def test_constant():
    assert lambda_at(0, 10, "constant") == 0.25
    assert lambda_at(7, 10, "constant", t_max=0.5) == 0.5


def test_cosine_endpoints_and_midpoint():
    assert lambda_at(0, 10, "cosine", t_max=1.0, t_min=0.1) == pytest.approx(0.1)
    assert lambda_at(5, 10, "cosine", t_max=1.0, t_min=0.1) == pytest.approx(0.55)
    assert lambda_at(10, 10, "cosine", t_max=1.0, t_min=0.1) == pytest.approx(1.0)
    quarter = 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2
    assert lambda_at(1, 4, "cosine", t_max=1.0, t_min=0.1) == pytest.approx(quarter)


def test_errors():
    with pytest.raises(ValueError, match="total_steps must be > 0, got 0"):
        lambda_at(0, 0)
    with pytest.raises(ValueError, match="total_steps"):
        lambda_at(1, -5)
    with pytest.raises(ValueError, match="unknown lambda schedule 'step'; allowed: linear"):
        lambda_at(1, 10, "step")
    with pytest.raises(ValueError, match="step must be >= 0"):
        lambda_at(-1, 10)
