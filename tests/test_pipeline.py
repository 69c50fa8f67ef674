"""The pipeline end to end on a tiny model, in-process on the shared Ray instance.

One full run (reference -> score -> partition -> sft + forget -> evaluate -> MLflow), then
the caching contract: a rerun redoes nothing, and a new rho re-partitions without
re-scoring.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from tiny_configs import TINY, runs_frame

from orchestrator.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    raw = dict(TINY, run_dir=str(root / "runs"))
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def first_run(ray_local, config_path):
    from orchestrator.pipeline.run import run_pipeline

    return run_pipeline(load_config(config_path))


def test_full_run_evaluates_every_model_and_tracks_it(first_run, config_path):
    ev = first_run["eval"]
    assert set(ev) == {"tiny-llama/base/-", "tiny-llama/sft/s42", "tiny-llama/forget/s42"}
    for metrics in ev.values():
        assert 0.0 <= metrics["lethe_synth_mc"]["acc"] <= 1.0

    (outcome,) = first_run["outcomes"]
    report = outcome.partition_report
    n = report["n_positive"] + report["n_negative"]
    assert report["n_positive"] == int(n * 0.7)
    assert 0.0 <= report["auroc"] <= 1.0  # synthetic data carries its noise mask

    cfg = load_config(config_path)
    uri = f"sqlite:///{cfg.run_dir}/{cfg.name}/mlflow.db"
    runs = runs_frame(uri, cfg.name, "tags.method = 'forget'")
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.family"] == "llama" and row["tags.rho"] == "0.7"
    assert row["tags.lambda_max"] == "0.25"
    assert 0.0 <= row["metrics.eval/lethe_synth_mc/acc"] <= 1.0
    assert "metrics.pos_loss" in runs.columns or "metrics.train/pos_loss" in runs.columns


def test_rerun_is_fully_cached(first_run, config_path, capsys):
    from orchestrator.pipeline.run import run_pipeline

    capsys.readouterr()
    again = run_pipeline(load_config(config_path))
    out = capsys.readouterr().out
    assert re.findall(r"stage \S+ +\w+  running", out) == []
    assert again["eval"] == first_run["eval"]
    assert "tiny-llama" in out and "forget" in out  # the comparison table was printed


def test_new_rho_repartitions_but_never_rescores(first_run, config_path, capsys):
    from orchestrator.pipeline.run import run_pipeline

    capsys.readouterr()
    run_pipeline(load_config(config_path, ["partition.rho=0.5"]), until="partition")
    out = capsys.readouterr().out
    assert re.search(r"stage scores +\w+  cached", out)
    assert re.search(r"stage reference +\w+  cached", out)
    assert re.search(r"stage partition +\w+  running", out)
    cfg = load_config(config_path)
    parts = list((cfg.run_dir and __import__("pathlib").Path(cfg.run_dir) / cfg.name / "stages"
                  / "partition").glob("*/_SUCCESS.json"))
    rhos = sorted(json.loads((p.parent / "inputs.json").read_text())["partition"]["rho"]
                  for p in parts)
    assert rhos == [0.5, 0.7]


def test_inspect_reads_the_cached_chain(first_run, config_path, tmp_path):
    """`lethe inspect` walks the same upstream chain as the run: every stage is found cached."""
    import pyarrow.parquet as pq

    from orchestrator.pipeline.run import inspect_sample_cli

    cfg = load_config(config_path)
    stages = __import__("pathlib").Path(cfg.run_dir) / cfg.name / "stages"
    (part,) = [p.parent for p in (stages / "partition").glob("*/_SUCCESS.json")
               if json.loads((p.parent / "inputs.json").read_text())["partition"]["rho"] == 0.7]
    sid = int(pq.read_table(part / "partitioned.parquet", columns=["sample_id"])[0][0].as_py())
    text = inspect_sample_cli(cfg, "tiny-llama", sid, html_out=str(tmp_path / "s.html"))
    assert str(sid) in text and (tmp_path / "s.html").stat().st_size > 0
