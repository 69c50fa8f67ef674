"""Fault drills with real processes (issue 12), each stopping what it started by PID:

- the pipeline driver SIGKILLed mid-scoring: the rerun computes only the blocks that are
  missing, and the scores equal an uninterrupted run's bit for bit;
- two `lethe run --until partition` processes on one config at once: both finish, every
  stage (the reference's Ray Train run and the scoring actors included) is computed by
  exactly one of them (the other waits for its lock or finds it done, with a message), and
  both end on the same stage outputs.

Both drive the session's Ray instance from subprocesses (`ray.init(address=...)`), so no
drill pays for a Ray start-up of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_faults import _assert_same_table
from test_scoring import _make_rows, _tiny_spec, _write_tokens
from tiny_configs import TINY

from orchestrator.cache import SUCCESS

pytestmark = [pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The driver's script: run_scoring with an actor class that takes a second per block, so the
# kill lands between blocks. The subclass is defined in __main__, so Ray ships it by value.
SLOW_DRIVER = textwrap.dedent("""
    import sys, time
    import ray
    from orchestrator.config import ScoringConfig
    from orchestrator.scoring import stage

    class SlowBlockScorer(stage.BlockScorer):
        def score_block(self, spec):
            time.sleep(1.0)
            return super().score_block(spec)

    stage.BlockScorer = SlowBlockScorer
    address, tokens, base, ref, out = sys.argv[1:6]
    ray.init(address=address)
    cfg = ScoringConfig(num_actors=1, batch_size=8, token_budget=200)
    print("driver: scoring", flush=True)
    stage.run_scoring(tokens, base, ref, cfg, out, block_rows=8)
    print("driver: finished (the kill came too late)", flush=True)
""")


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _no_alive_actor(class_name: str, timeout: float = 60.0) -> None:
    """Ray kills a dead driver's actors; wait until it has (its in-flight block included)."""
    import ray
    from ray.util.state import list_actors

    # This session's instance by address: another Ray on the machine must not be picked.
    address = ray.get_runtime_context().gcs_address
    deadline = time.time() + timeout
    while list_actors(address=address,
                      filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")]):
        assert time.time() < deadline, f"{class_name} actors outlived their driver"
        time.sleep(0.5)


@pytest.mark.slow
def test_driver_sigkilled_mid_scoring_rerun_scores_only_the_missing_blocks(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from orchestrator.config import ScoringConfig
    from orchestrator.models import build_model
    from orchestrator.scoring import run_scoring, score_files

    models = []
    for role, seed in (("base", 0), ("ref", 1)):
        build_model(_tiny_spec("llama"), 97, seed=seed).save_pretrained(str(tmp_path / role))
        models.append(str(tmp_path / role))
    tokens = _write_tokens(_make_rows(40), tmp_path / "tokens.parquet")  # 5 blocks of 8
    cfg = ScoringConfig(num_actors=1, batch_size=8, token_budget=200)
    clean = run_scoring(tokens, *models, cfg, tmp_path / "clean", block_rows=8)

    hurt = tmp_path / "hurt"
    log = tmp_path / "driver.log"
    with log.open("w") as fh:
        driver = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, _gcs_address(), str(tokens),
                                   *models, str(hurt)], stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (hurt / "part-00000.parquet").exists():
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the driver wrote no block in 2 minutes"
            time.sleep(0.05)
    finally:
        _kill(driver)  # SIGKILL: no cleanup, no marker, its actor is orphaned mid-block
    _no_alive_actor("SlowBlockScorer")

    assert not (hurt / SUCCESS).exists()
    written = len(score_files(hurt))
    assert 1 <= written < 5, f"{written} of 5 blocks were written before the kill"

    run_scoring(tokens, *models, cfg, hurt, block_rows=8)
    summary = json.loads((hurt / SUCCESS).read_text())
    assert summary["blocks_skipped"] == written
    assert summary["blocks_computed"] == 5 - written
    assert not list(hurt.glob("_*.tmp"))
    for a, b in zip([pq.read_table(p) for p in score_files(clean)],
                    [pq.read_table(p) for p in score_files(hurt)], strict=True):
        _assert_same_table(a, b)


@pytest.mark.slow
def test_two_lethe_runs_on_one_config_compute_each_stage_once(ray_local, tmp_path):
    """Both `lethe run --until partition` processes finish; each stage (data, base, tokens,
    the reference's Ray Train run, the scoring actors, the partition) is computed by exactly
    one of them, the other waits for its lock or finds it done; one set of outputs."""
    import pyarrow.parquet as pq

    raw = json.loads(json.dumps(TINY))
    raw.update(run_dir=str(tmp_path / "runs"), name="two-runs")
    # The smallest corpus that still gives the reference a few steps and scoring two blocks.
    raw["data"]["synthetic"].update(num_train=48, num_eval=8)
    raw["ray"] = {**raw.get("ray", {}), "address": _gcs_address()}
    raw["tracking"] = {"enabled": False}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [str(BIN / "lethe"), "run", str(cfg), "--until", "partition"]
    logs = [tmp_path / f"run{i}.log" for i in (1, 2)]
    procs = []
    try:
        for log in logs:
            with log.open("w") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                              cwd=ROOT, start_new_session=True))
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            _kill(p)
    texts = [log.read_text() for log in logs]
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == 0, text[-4000:]

    # "[lethe] stage <name> <key>  running|cached": each stage key is computed ("running")
    # by exactly one process, and both processes went through the same stages.
    stage_line = re.compile(r"\[lethe\] (?:\d\d:\d\d:\d\d )?stage (\S+)\s+([0-9a-f]{16})\s+(running|cached)")
    seen = [{(m[1], m[2]): m[3] for m in stage_line.finditer(t)} for t in texts]
    assert seen[0].keys() == seen[1].keys(), (seen, texts[1][-3000:])
    names = {name for name, _ in seen[0]}
    assert {"synthetic", "base", "tokens", "reference", "scores", "partition"} <= names, names
    for key in seen[0]:
        assert sorted((seen[0][key], seen[1][key])) == ["cached", "running"], (key, seen)
    # (Usually one also printed "another run ... is computing it; waiting": not asserted, a
    # process that starts late finds every stage done.)

    # One set of outputs, marked done once; the scores were computed in one pass (no block
    # found done, none written twice) and the partition covers every scored row.
    stages = Path(raw["run_dir"]) / "two-runs" / "stages"
    for name, key in seen[0]:
        assert (stages / name / key / SUCCESS).is_file()
    assert not list(stages.rglob("_*.tmp"))
    [scores] = [stages / "scores" / key / "scores" for name, key in seen[0] if name == "scores"]
    summary = json.loads((scores / SUCCESS).read_text())
    assert summary["blocks_skipped"] == 0 and summary["blocks_computed"] >= 1, summary
    assert len(list(scores.glob("part-*.parquet"))) == summary["blocks_computed"]
    [part] = [stages / "partition" / key for name, key in seen[0] if name == "partition"]
    scored = sum(pq.ParquetFile(f).metadata.num_rows for f in scores.glob("part-*.parquet"))
    assert pq.ParquetFile(part / "partitioned.parquet").metadata.num_rows == scored
