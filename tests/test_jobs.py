"""The `python -m jobs.X` entry points map onto the right `lethe` command and stage."""

from __future__ import annotations

import runpy
import sys

import pytest

import jobs._entry as entry_mod


@pytest.mark.parametrize("job, expected", [
    ("pipeline", ["run", "c.yaml", "partition.rho=0.6", "--preflight"]),
    ("score", ["run", "c.yaml", "partition.rho=0.6", "--until", "partition"]),
    ("train", ["run", "c.yaml", "partition.rho=0.6", "--until", "train"]),
    ("evaluate", ["run", "c.yaml", "partition.rho=0.6", "--until", "evaluate"]),
    ("tune", ["tune", "c.yaml", "partition.rho=0.6"]),
])
def test_job_entry_points(monkeypatch, job, expected):
    seen = []
    monkeypatch.setattr(entry_mod, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [f"jobs.{job}", "--config", "c.yaml", "partition.rho=0.6"])
    with pytest.raises(SystemExit) as ei:
        runpy.run_module(f"jobs.{job}", run_name="__main__")
    assert ei.value.code == 0
    assert seen == [expected]
