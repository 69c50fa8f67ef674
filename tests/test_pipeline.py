"""The pipeline end to end on a tiny model: ONE full run (reference -> score -> partition ->
sft + forget -> evaluate -> MLflow), submitted with `ray job submit` to a Ray head started
here on 127.0.0.1 (stopped by PID); then, in this process on the shared Ray instance, the
caching contract on that run's directory: a rerun finds every stage done (the job's keys
are this process's keys), a new rho re-partitions without re-scoring, and a 2-trial Ray
Tune sweep over lambda and rho reuses the run's reference and scores.

The head runs with token authentication disabled for both ends (Ray 2.60 turns it on for
local clusters by default) and every port chosen free, so it never collides with the test
session's own local Ray instance. (One run serves all of it: a second full run in this
process cost ~120 s on the 2-core machine and checked the same stages; the sweep computing
its own reference and scores cost ~40 s more.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from proc_tree import free_port, stop_tree
from tiny_configs import TINY, runs_frame

from orchestrator.config import load_config
from orchestrator.tracking.target import RunLabel

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def _ray_head():
    """A Ray head on free loopback ports; yields its dashboard (job API) address."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are capped
    dash = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--num-cpus=4", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 90
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        yield address
    finally:
        stop_tree(proc, grace=2)  # exactly what this fixture started, and everything under it
        shutil.rmtree(temp_dir, ignore_errors=True)


# Validation every 2 steps: the sweep below ranks its trials by intermediate val_loss reports,
# and its reference and scores must be this run's (the key includes eval_every).
RAW = dict(TINY, train=dict(TINY["train"], eval_every=2))


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    raw = dict(RAW, run_dir=str(root / "runs"))
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def submitted(config_path):
    """The full run, through `ray job submit`: (final status, the job's logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    with _ray_head() as head:
        out = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", head, "--no-wait",
             "--working-dir", str(ROOT),
             "--runtime-env", str(ROOT / "cluster/runtime_env.local.yaml"),
             "--", "python", "-m", "jobs.pipeline", "--config", str(config_path)],
            env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)  # output has ANSI codes
        client = JobSubmissionClient(head)
        deadline = time.time() + 600
        status = client.get_job_status(job_id)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, "job did not finish in 10 minutes"
            time.sleep(2)
            status = client.get_job_status(job_id)
        return status, client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def first_run(submitted, ray_local, config_path):
    """The same config rerun in this process after the job: (results, what it printed)."""
    from orchestrator.pipeline.run import run_pipeline

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = run_pipeline(load_config(config_path))
    return results, printed.getvalue()


def _uri(config_path) -> str:
    cfg = load_config(config_path)
    return f"sqlite:///{cfg.run_dir}/{cfg.name}/mlflow.db"


def test_pipeline_through_ray_job_submit(submitted, config_path):
    from ray.job_submission import JobStatus

    status, logs = submitted
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "pipeline finished" in logs
    for stage in ("reference", "scores", "partition", "train"):  # the job did the work
        assert re.search(rf"stage {stage} +\w+  running", logs), stage

    runs = runs_frame(_uri(config_path), TINY["name"], "tags.method = 'forget'")
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.family"] == "llama" and row["tags.rho"] == "0.7"
    assert row["tags.lambda_max"] == "0.25"
    assert 0.0 <= row["metrics.eval/lethe_synth_mc/acc"] <= 1.0
    assert "metrics.pos_loss" in runs.columns or "metrics.train/pos_loss" in runs.columns


def test_full_run_evaluates_every_model_and_tracks_it(first_run):
    results, _ = first_run
    ev = results["eval"]
    assert set(ev) == {"tiny-llama/base/-", "tiny-llama/sft/s42", "tiny-llama/forget/s42"}
    for metrics in ev.values():
        assert 0.0 <= metrics["lethe_synth_mc"]["acc"] <= 1.0

    (outcome,) = results["outcomes"]
    report = outcome.partition_report
    n = report["n_positive"] + report["n_negative"]
    assert report["n_positive"] == int(n * 0.7)
    assert 0.0 <= report["auroc"] <= 1.0  # synthetic data carries its noise mask


def test_rerun_is_fully_cached(first_run, submitted, config_path):
    """The rerun in this process found every stage the job computed, and reads back the
    evaluation results the job logged."""
    results, out = first_run
    assert re.findall(r"stage \S+ +\w+  running", out) == []
    assert len(re.findall(r"stage \S+ +\w+  cached", out)) >= 8
    assert "tiny-llama" in out and "forget" in out  # the comparison table was printed
    assert "tiny-llama" in submitted[1] and "forget" in submitted[1]  # also by the job

    runs = runs_frame(_uri(config_path), TINY["name"])
    for text, metrics in results["eval"].items():
        mine = runs[runs["tags.mlflow.runName"] == RunLabel.parse(text).run_name]
        logged = mine["metrics.eval/lethe_synth_mc/acc"].dropna()
        assert len(logged) >= 1 and (logged == metrics["lethe_synth_mc"]["acc"]).all(), text


def test_new_rho_repartitions_but_never_rescores(first_run, config_path, capsys):
    from orchestrator.pipeline.run import run_pipeline

    capsys.readouterr()
    run_pipeline(load_config(config_path, ["partition.rho=0.5"]), until="partition")
    out = capsys.readouterr().out
    assert re.search(r"stage scores +\w+  cached", out)
    assert re.search(r"stage reference +\w+  cached", out)
    assert re.search(r"stage partition +\w+  running", out)
    cfg = load_config(config_path)
    parts = list((Path(cfg.run_dir) / cfg.name / "stages" / "partition").glob("*/_SUCCESS.json"))
    rhos = sorted(json.loads((p.parent / "inputs.json").read_text())["partition"]["rho"]
                  for p in parts)
    assert rhos == [0.5, 0.7]


def test_inspect_reads_the_cached_chain(first_run, config_path, tmp_path):
    """`lethe inspect` walks the same upstream chain as the run: every stage is found cached."""
    import pyarrow.parquet as pq

    from orchestrator.pipeline.run import inspect_sample_cli

    cfg = load_config(config_path)
    stages = Path(cfg.run_dir) / cfg.name / "stages"
    (part,) = [p.parent for p in (stages / "partition").glob("*/_SUCCESS.json")
               if json.loads((p.parent / "inputs.json").read_text())["partition"]["rho"] == 0.7]
    sid = int(pq.read_table(part / "partitioned.parquet", columns=["sample_id"])[0][0].as_py())
    text = inspect_sample_cli(cfg, "tiny-llama", sid, html_out=str(tmp_path / "s.html"))
    assert str(sid) in text and (tmp_path / "s.html").stat().st_size > 0


def test_sweep_reuses_scores_and_tracks_every_trial(first_run, ray_local, config_path, capsys):
    """Two trials (each costs a Ray Train run and an evaluation) become MLflow runs with
    distinct hyperparameters, the best configuration loads as a valid config, and the trials
    share the run's scores: nothing upstream of the partition runs again. Last in this file:
    it adds partitions (one per trial rho) that the tests above do not expect."""
    from orchestrator.tune.sweep import proposed_trials, run_sweep

    raw = yaml.safe_load(config_path.read_text())
    raw["train"] = dict(raw["train"], methods=["forget"])
    raw["evaluate"] = dict(raw["evaluate"], evaluate_base=False)
    raw["tune"] = {"num_samples": 2, "lambda_max": [0.05, 0.5], "rho": [0.5, 0.9],
                   "grace_period": 2, "max_concurrent_trials": 2, "metric": "val_loss"}
    path = config_path.parent / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    capsys.readouterr()

    out = run_sweep(cfg)

    rows = out["rows"]
    assert len(rows) == 2 and not any(r["error"] for r in rows)
    assert len({(r["lambda_max"], r["rho"]) for r in rows}) == 2
    # The trials that ran are the seeded proposals: a rerun of this config runs the same.
    assert sorted((r["lambda_max"], r["rho"]) for r in rows) == sorted(
        (p["lambda_max"], p["rho"]) for p in proposed_trials(cfg))
    assert all(0.05 <= r["lambda_max"] <= 0.5 and 0.5 <= r["rho"] <= 0.9 for r in rows)

    best = load_config(out["best_config"])  # a ready, valid experiment config
    assert best.partition.rho == pytest.approx(out["best"]["rho"])
    assert best.train.lambda_.t_max == pytest.approx(out["best"]["lambda_max"])
    assert best.train.methods == ["forget"]

    printed = capsys.readouterr().out
    for stage in ("base", "tokens", "reference", "scores"):  # the sweep's shared stages
        assert re.search(rf"stage {stage} +\w+  cached", printed), stage
        assert not re.search(rf"stage {stage} +\w+  running", printed), stage
    stages = Path(cfg.run_dir) / cfg.name / "stages"
    assert len(list((stages / "scores").glob("*/_SUCCESS.json"))) == 1  # scored once
    rhos = sorted(json.loads((p.parent / "inputs.json").read_text())["partition"]["rho"]
                  for p in (stages / "partition").glob("*/_SUCCESS.json"))
    assert rhos == sorted([0.5, 0.7, *(r["rho"] for r in rows)])  # one per trial rho

    runs = runs_frame(f"sqlite:///{cfg.run_dir}/{cfg.name}/mlflow.db", cfg.name)
    trials = runs[runs.get("tags.trial_id").notna()]
    assert len(trials) == 2
    assert trials["tags.rho"].nunique() == 2 and trials["tags.lambda_max"].nunique() == 2
    assert trials["params.train.lambda.t_max"].nunique() == 2  # logged by training's rank 0
    # ASHA may stop weak trials before their training ends; the ones that finish are
    # evaluated, the stopped ones are not.
    finished = [r for r in rows if r["finished"]]
    assert finished
    evaluated = trials["metrics.eval/lethe_synth_mc/acc"].dropna()
    assert len(evaluated) == len(finished) and evaluated.between(0.0, 1.0).all()
    assert "lambda_max" in printed and "[lethe] best:" in printed  # the trial table
    assert len(json.loads((Path(cfg.run_dir) / cfg.name / "sweep_trials.json").read_text())) == 2
