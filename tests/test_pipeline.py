"""The pipeline end to end on a tiny model: ONE full run (reference -> score -> partition ->
sft + forget -> evaluate -> MLflow -> report), submitted with `ray job submit` to the test
session's own local Ray instance (conftest's `ray_local`, through its dashboard's job API:
no second Ray head); then, in this process on the same instance, the caching contract on
that run's directory: a rerun finds every stage done (the job's keys are this process's
keys), a new rho re-partitions without re-scoring, and a 2-trial Ray Tune sweep over lambda
and rho reuses the run's reference and scores.

What the run must deliver, not only that it ran: the partition finds the synthetic noise
well above chance (AUROC, margin measured below), the forget model is neither the sft model
nor the base, every model x method has its evaluation, and the report.html the job wrote
has every section filled. (One run serves all of it: a second full run in this process cost
~120 s on the 2-core machine and checked the same stages; the sweep computing its own
reference and scores cost ~40 s more.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_configs import TINY, runs_frame

from orchestrator.config import load_config
from orchestrator.tracking.target import RunLabel

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    """`ray job submit`'s environment: this one without RAY_ADDRESS (the CLI is given the
    address), the venv first on PATH. The local instance's token auth applies as set up."""
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


def _job_api(ray_local) -> str:
    """The shared local instance's dashboard (job API) address."""
    return "http://" + ray_local._private.worker.get_dashboard_url()


def _submit(address: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the dashboard has no job agent yet (it answers before
    the agent is up; Ray says "No available agent to submit job, please try again later")."""
    for _ in range(60):
        out = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, *argv],
                             env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out


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
def submitted(config_path, ray_local):
    """The full run, through `ray job submit` to the session's local instance: (final status,
    the job's logs, the report.html the job wrote, read before anything reruns)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = _job_api(ray_local)
    out = _submit(address, [
        "--no-wait", "--working-dir", str(ROOT),
        "--runtime-env", str(ROOT / "cluster/runtime_env.local.yaml"),
        # the venv's interpreter: the job runs in the instance's environment, not this PATH
        "--", sys.executable, "-m", "jobs.pipeline", "--config", str(config_path)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)  # output has ANSI codes
    client = JobSubmissionClient(address)
    deadline = time.time() + 600
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(2)
        status = client.get_job_status(job_id)
    cfg = load_config(config_path)
    report = Path(cfg.run_dir) / cfg.name / "report.html"
    return status, client.get_job_logs(job_id), report.read_text() if report.is_file() else None


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

    status, logs, _ = submitted
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


def test_full_run_evaluates_every_model_and_tracks_it(first_run, config_path):
    """Every model x (base + each method) has its evaluation, every task's metric in [0, 1],
    also in MLflow."""
    results, _ = first_run
    cfg = load_config(config_path)
    ev = results["eval"]
    seeds = cfg.seeds or [cfg.train.seed]
    expected = {f"{m.name}/base/-" for m in cfg.models} | {
        f"{m.name}/{method}/s{seed}" for m in cfg.models for method in cfg.train.methods
        for seed in seeds}
    assert set(ev) == expected == {"tiny-llama/base/-", "tiny-llama/sft/s42",
                                   "tiny-llama/forget/s42"}
    for label, metrics in ev.items():
        assert set(metrics) >= set(cfg.evaluate.tasks), label
        assert 0.0 <= metrics["lethe_synth_mc"]["acc"] <= 1.0, label
    runs = runs_frame(_uri(config_path), cfg.name)
    for label in expected:
        mine = runs[runs["tags.mlflow.runName"] == RunLabel.parse(label).run_name]
        assert mine["metrics.eval/lethe_synth_mc/acc"].notna().any(), label

    (outcome,) = results["outcomes"]
    report = outcome.partition_report
    n = report["n_positive"] + report["n_negative"]
    assert report["n_positive"] == int(n * 0.7)
    assert report["n_noise"] > 0  # the synthetic corpus carries its noise mask


# The partition must find the synthetic noise: AUROC of the score as a noise detector.
# Measured with this config (run_pipeline until the partition; seed / data seed 0/1, 1/2, 2/3):
# 0.624, 0.670, 0.713 (0.624 is this run's). About 170-200 response tokens are noise, so a
# score that knows nothing of the noise has AUROC 0.5 with a standard error of
# sqrt(1 / (12 x 172)) = 0.022: the floor 0.55 is 2.3 such errors above chance, and the
# weakest measured run is 3.4 errors above the floor.
AUROC_FLOOR = 0.55


def test_partition_finds_the_noise_above_chance(first_run):
    (outcome,) = first_run[0]["outcomes"]
    report = outcome.partition_report
    assert report["auroc"] > AUROC_FLOOR, report


def _weights(folder: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out: dict = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test_forget_model_is_neither_the_sft_model_nor_the_base(first_run):
    """Training moved the weights, and the forget model is its own (same base, seed and data
    order as sft): an export of the wrong folder (sft's, or the base) fails here. Measured
    on this run: ||sft - base|| = 0.112 ||base||, ||forget - base|| = 0.115 ||base||,
    ||forget - sft|| = 0.64 x ||sft - base|| (the sweep's trials at lambda 0.05 and 0.22:
    0.75, 0.74); the floors are 10x and 3x below."""
    import torch

    (outcome,) = first_run[0]["outcomes"]
    seed = next(s for m, s in outcome.models if m == "forget")
    base, sft, forget = (_weights(p) for p in (outcome.base_model, outcome.models[("sft", seed)],
                                                 outcome.models[("forget", seed)]))
    assert set(forget) == set(sft) == set(base)

    def distance(a: dict, b: dict) -> float:
        """||a - b|| over every weight, relative to ||b||."""
        num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
        den = sum(float(b[k].double().pow(2).sum()) for k in b)
        return (num / den) ** 0.5

    moved = distance(sft, base)  # what plain SFT moved the weights, relative to the base
    assert moved > 0.01, moved
    assert distance(forget, base) > 0.01, distance(forget, base)
    # forget vs sft: a sizeable share of what training moved at all
    assert distance(forget, sft) > 0.2 * moved, (distance(forget, sft), moved)
    # every one of the 12 tensors moved, from both (embeddings, norms and projections)
    assert not any(torch.equal(forget[k], sft[k]) or torch.equal(forget[k], base[k])
                   for k in forget)


def test_the_report_the_job_wrote_has_every_section(submitted, config_path):
    """runs/<name>/report.html as the job left it (read before the rerun below rewrote it):
    every section present and filled from this run (the report tests otherwise read a
    fabricated MLflow store)."""
    from html.parser import HTMLParser

    status, logs, text = submitted
    assert text is not None, "the job wrote no report.html"
    assert "report:" in logs and "could not be written" not in logs

    class Ids(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.ids, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if dict(attrs).get("id"):
                self.ids.append(dict(attrs)["id"])

    page = Ids()
    page.feed(text)
    for anchor in ("comparison", "partition", "curves", "inspector", "timeline", "config"):
        assert anchor in page.ids, anchor
    for empty in ("no evaluated runs under this pipeline run", "no partition statistics recorded",
                  "no training curves recorded", "no token-inspector samples recorded",
                  "no timeline recorded", "the timeline holds no spans"):
        assert empty not in text, empty
    assert "has no partition" not in text and "could not be" not in text  # no failed piece
    cfg = load_config(config_path)
    assert cfg.name in text and "tiny-llama" in text
    assert all(f"<th>{m}</th>" in text for m in ("base", *cfg.train.methods))
    assert page.tags.count("img") >= 3 and page.tags.count("iframe") >= 1
    assert "rho: 0.7" in text  # the resolved config, verbatim


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
