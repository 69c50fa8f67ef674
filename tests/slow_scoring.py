"""A scoring stage slow enough to act on while it runs, for the tests that kill or add
processes mid-stage (tests/test_drills.py, tests/test_cluster_late_node.py).

`start_slow_scoring` runs `run_scoring` in a driver subprocess attached to a running Ray
cluster, with a scorer that sleeps a second per batch. The subclass is defined in the
driver's __main__, so Ray ships it by value; Ray Data names its pool's actor class after it
(`SCORER`). Each test keeps its own waits (what it polls for, how long) around the driver.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from test_scoring import _make_rows, _tiny_spec, _write_tokens

ROOT = Path(__file__).resolve().parents[1]
SCORER = "MapWorker(MapBatches(SlowScoreBatches))"

_DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from orchestrator.config import ScoringConfig
    from orchestrator.scoring import stage

    class SlowScoreBatches(stage.ScoreBatches):
        def __call__(self, table):
            time.sleep(1.0)
            return super().__call__(table)

    stage.ScoreBatches = SlowScoreBatches
    address, tokens, base, ref, out, scoring, options = sys.argv[1:8]
    ray.init(address=address)
    cfg = ScoringConfig(**json.loads(scoring))
    print("driver: scoring", flush=True)
    stage.run_scoring(tokens, base, ref, cfg, out, **json.loads(options))
    print("driver: finished", flush=True)
""")


def models_and_tokens(tmp_path: Path, rows: int) -> tuple[list[str], Path]:
    """A tiny base and reference model (different seeds) and `rows` tokenized rows."""
    from orchestrator.models import build_model

    models = []
    for role, seed in (("base", 0), ("ref", 1)):
        build_model(_tiny_spec("llama"), 97, seed=seed).save_pretrained(str(tmp_path / role))
        models.append(str(tmp_path / role))
    return models, _write_tokens(_make_rows(rows), tmp_path / "tokens.parquet")


def start_slow_scoring(address: str, tokens: Path, models: list[str], out: Path, log: Path,
                       scoring: dict[str, Any], env: dict[str, str] | None = None,
                       **run_options: Any) -> subprocess.Popen:
    """The driver, started in its own session with stdout and stderr in `log`: it connects
    to `address`, scores `tokens` into `out` with `ScoringConfig(**scoring)` and
    `run_scoring(..., **run_options)`, and prints "driver: finished" when the stage is done.
    The caller stops it (by PID) if it is still running."""
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", _DRIVER, address, str(tokens), *models, str(out),
             json.dumps(scoring), json.dumps(run_options)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
