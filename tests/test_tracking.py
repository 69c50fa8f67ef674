"""MLflow tracking: local sqlite store, compare table, reachability, a live server (the token
inspector is in tests/test_tracking_inspect.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from orchestrator.config import ExperimentConfig, TrackingConfig
from orchestrator.tracking import (
    NullTracker,
    Tracker,
    TrackingError,
    TrackingTarget,
    check_reachable,
    flatten_config,
    open_run,
    resolve_tracking_uri,
)
from orchestrator.tracking.target import PARAM_VALUE_MAX, TRUNCATION_MARKER, param_value

SECRET = "hf_SuperSecretValue_12345"


def _config(name: str = "exp-track", run_dir: str = "runs", **extra) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": name, "run_dir": run_dir,
        "models": [
            {"name": f"m{i}", "family": "llama",
             "from_config": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}}
            for i in range(3)
        ],
        **extra,
    })


def _search(uri: str, experiment: str, filt: str = ""):
    import mlflow

    from orchestrator.tracking.compare import _tracking_uri

    with _tracking_uri(uri):  # leaves no MLFLOW_TRACKING_URI behind for later tests
        return mlflow.search_runs(experiment_names=[experiment], filter_string=filt,
                                  output_format="pandas")


# ------------------------------------------------------------------------ URIs and reachability


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(tracking_uri="http://127.0.0.1:1")
    assert resolve_tracking_uri(cfg, tmp_path) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    # The config's URI is the experiment's explicit choice; the variable is inherited (a
    # cluster node's, a shell's): it only fills in where the config names none.
    assert resolve_tracking_uri(cfg, tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    port = _free_port()  # closed once the socket is released
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        Tracker.open(_config(run_dir=str(tmp_path)), tmp_path)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert f"MLflow tracking server at http://127.0.0.1:{port} is not reachable" in msg
    assert "MLFLOW_TRACKING_URI" in msg and "tracking.enabled=false" in msg


def test_disabled_tracking_is_a_no_op(tmp_path):
    tracker = Tracker.open(_config(tracking={"enabled": False}), tmp_path)
    assert isinstance(tracker, NullTracker)
    parent = tracker.start_parent("p", _config())
    parent.log_metrics({"a": 1.0})
    with tracker.child("c", {"method": "sft"}) as run:
        run.log_eval_metrics({"t": {"acc": 0.5}})
        run.log_dict({"x": 1}, "x.json")
    tracker.end_parent()
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------ params / flattening


def test_flatten_and_truncate():
    flat = flatten_config({"a": {"b": 1, "c": [1, 2]}, "m": [{"n": "x"}, {"n": "y"}], "e": {}})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "m.0.n": "x", "m.1.n": "y", "e": "{}"}
    long = param_value("x" * 2000)
    assert len(long) == PARAM_VALUE_MAX and long.endswith(TRUNCATION_MARKER)
    assert param_value(f"path/{SECRET}/x", {SECRET}) == "path/***/x"


@pytest.fixture()
def sqlite_tracker(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to ./mlruns would show up here
    run_dir = tmp_path / "run"
    cfg = _config(run_dir=str(run_dir))
    return Tracker.open(cfg, run_dir), cfg, run_dir


def test_tracker_logs_parent_children_params_tags_metrics_artifacts(sqlite_tracker, monkeypatch):
    tracker, cfg, run_dir = sqlite_tracker
    monkeypatch.setenv("HF_TOKEN", SECRET)
    # A config value that happens to contain the secret must not reach MLflow.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": f"/d/{SECRET}"})})
    flat = flatten_config(cfg.to_dict())
    assert len(flat) > 100  # the batches must be chunked

    parent = tracker.start_parent("pipeline", cfg)
    tags = {"family": "llama", "method": "forget", "rho": 0.7, "lambda_max": 0.25,
            "lambda_schedule": "linear", "negative_term": "ascent", "seed": 1, "model": "m0"}
    with tracker.child("m0/forget/s1", tags) as run:
        run.log_metrics({"train/loss": 1.5, "bad": float("nan")}, step=3)
        run.log_eval_metrics({"lethe_synth_mc": {"acc": 0.75}})
        histogram = run_dir / "histogram.png"  # drawn once, by the partition stage
        histogram.write_bytes(b"\x89PNG\r\n\x1a\n")
        run.log_partition_stats({"n_tokens": 10, "threshold": 0.1,
                                 "histogram": {"edges": [0, 1, 2], "positive": [3, 4],
                                               "negative": [2, 1]}}, histogram=histogram)
        run.log_dict({"k": [1, 2]}, "extra/info.json")
        target = run.target
    with pytest.raises(RuntimeError):
        with tracker.child("stage-that-fails", {"stage": "score"}):
            raise RuntimeError("boom")
    tracker.end_parent()

    runs = _search(tracker.uri, cfg.name)
    assert len(runs) == 3
    p = runs[runs["run_id"] == parent.run_id].iloc[0]
    params = {c[len("params."):]: v for c, v in p.items()
              if c.startswith("params.") and isinstance(v, str)}
    assert len(params) == len(flat)
    assert params["train.lr"] == str(cfg.train.lr) and params["models.2.name"] == "m2"
    assert params["data.path"] == "/d/***"
    assert not any(SECRET in v for v in params.values())
    assert p["tags.lethe.version"] == "0.1.0" and p["status"] == "FINISHED"
    assert re.fullmatch(r"[0-9a-f]{40}", p["tags.lethe.git_commit"])

    c = runs[runs["run_id"] == target.run_id].iloc[0]
    assert c["tags.mlflow.parentRunId"] == parent.run_id
    assert {c[f"tags.{k}"] for k in ("family", "method", "seed", "rho")} == {"llama", "forget",
                                                                             "1", "0.7"}
    assert c["metrics.train/loss"] == 1.5 and c["metrics.eval/lethe_synth_mc/acc"] == 0.75
    assert c["metrics.partition/n_tokens"] == 10 and "metrics.bad" not in runs.columns
    failed = runs[runs["tags.mlflow.runName"] == "stage-that-fails"].iloc[0]
    assert failed["status"] == "FAILED" and failed["tags.lethe.kind"] == "stage"

    # Artifacts land under the run directory, never in ./mlruns.
    art = run_dir / "mlartifacts"
    assert (art / cfg.name).exists() is False  # experiment folders are ids, not names
    files = {p.as_posix().split("/artifacts/", 1)[1] for p in art.rglob("*") if p.is_file()}
    assert {"config.json", "extra/info.json", "partition/partition_stats.json",
            "partition/histogram.png"} <= files
    assert not Path("mlruns").exists()

    # A worker (here: this process) logs into the run through its JSON target.
    as_json = json.loads(json.dumps(target.to_dict()))
    with open_run(as_json) as worker_run:
        import mlflow

        mlflow.log_metric("worker/fluent", 2.0)
        worker_run.log_metrics({"worker/client": 3.0})
    c = _search(tracker.uri, cfg.name, f"attributes.run_id = '{target.run_id}'").iloc[0]
    assert c["metrics.worker/fluent"] == 2.0 and c["metrics.worker/client"] == 3.0
    assert TrackingTarget.from_dict(as_json) == target


def test_compare_mean_std_over_seeds(sqlite_tracker, tmp_path, capsys):
    from orchestrator.tracking.compare import cli_compare, compare

    tracker, cfg, run_dir = sqlite_tracker
    known = {  # (model, method) -> per-seed acc
        ("m0", "sft"): [0.5, 0.6], ("m0", "forget"): [0.7, 0.8], ("m1", "sft"): [0.2, 0.2],
    }
    tracker.start_parent("old", cfg)  # an older invocation must not leak into the table
    with tracker.child("old", {"family": "llama", "model": "m0", "method": "sft", "seed": 0}) as r:
        r.log_eval_metrics({"mc": {"acc": 0.0}})
    tracker.end_parent()
    time.sleep(0.01)
    tracker.start_parent("new", cfg)
    for (model, method), accs in known.items():
        for seed, acc in enumerate(accs):
            with tracker.child(f"{model}/{method}/s{seed}", {"family": "llama", "model": model,
                                                             "method": method, "seed": seed}) as r:
                r.log_eval_metrics({"mc": {"acc": acc}, "gen": {"exact_match": acc / 2}})
    with tracker.child("score", {"stage": "score"}) as r:  # stage runs are not rows
        r.log_metrics({"score/seconds": 1.0})
    tracker.end_parent()

    table = compare(tracker.uri, cfg.name)
    assert list(table.index) == [("m0", "sft"), ("m0", "forget"), ("m1", "sft")]
    assert table.loc[("m0", "sft"), "mc/acc"] == "0.550 ± 0.071"
    assert table.loc[("m0", "forget"), "mc/acc"] == "0.750 ± 0.071"
    assert table.loc[("m1", "sft"), "gen/exact_match"] == "0.100 ± 0.000"
    assert table["seeds"].tolist() == [2, 2, 2]

    out = tmp_path / "cmp"
    cli_compare(tracker.uri, cfg.name, out)
    printed = capsys.readouterr().out
    assert "0.550 ± 0.071" in printed and "forget" in printed
    assert (out / "compare_mc__acc.png").read_bytes()[:4] == b"\x89PNG"
    parent_art = next((run_dir / "mlartifacts").rglob("compare/compare.txt"))
    assert "0.750 ± 0.071" in parent_art.read_text()


def _log_scripted_pipeline(tracker, cfg, run_dir, tmp_path, benchmarks=None):
    """Partition and eval results of a scripted pipeline run, logged through the glue:
    m2 has forget − sft ≈ +0.05 over 3 seeds, m0 ≈ +0.002 (inside the seed noise)."""
    from orchestrator.pipeline.tracking_glue import PipelineTracking

    ev = {"tasks": ["zz", "aa"], "benchmarks": benchmarks or {}}
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_validate(ev)})
    track = PipelineTracking(tracker, cfg, run_dir)
    track.start(cfg, None, "p")
    specs = {m.name: m for m in cfg.models}
    results = {}
    for model, gain in (("m2", 0.05), ("m0", 0.0)):  # logged out of config order on purpose
        for seed, noise in zip((1, 2, 3), (0.0, 0.03, -0.02), strict=True):
            for method in ("forget", "sft"):
                acc = 0.5 + noise + (gain + 0.001 * seed if method == "forget" else 0.0)
                results[f"{model}/{method}/s{seed}"] = {"aa": {"acc": acc}, "zz": {"f1": acc / 2}}
        track.log_partition(specs[model], {
            "auroc": 0.7, "precision": 0.2, "recall": 0.6, "f1": 0.3,
            "noise_by_kind": {"typo": {"n_noise": 10, "recall": 0.9, "auroc": 0.95},
                              "wrong_value": {"n_noise": 5, "recall": 0.4, "auroc": 0.55}}},
            tmp_path)
    track.log_eval(results, {label: tmp_path for label in results})
    track.finish_children()
    return cfg


def test_compare_effects_noise_kinds_and_config_order(sqlite_tracker, tmp_path, capsys):
    """Through MLflow: the pipeline glue logs partition stats per noise kind and eval
    metrics; compare prints and logs the paired effects and the noise table, in the
    config's order of families, methods and tasks."""
    from orchestrator.tracking.compare import CompareOrder, cli_compare, comparison_report

    tracker, cfg, run_dir = sqlite_tracker
    cfg = _log_scripted_pipeline(tracker, cfg, run_dir, tmp_path)
    order = CompareOrder.from_config(cfg)
    table = cli_compare(tracker.uri, cfg.name, tmp_path / "cmp", order=order)
    printed = capsys.readouterr().out
    assert list(table.index) == [("m0", "sft"), ("m0", "forget"), ("m2", "sft"), ("m2", "forget")]
    assert list(table.columns) == ["seeds", "zz/f1", "aa/acc"]  # evaluate.tasks order
    assert "m2  forget − sft (3 paired seeds): better beyond the seed noise on zz/f1, aa/acc" in printed
    assert "m0  forget − sft (3 paired seeds): within the seed noise on zz/f1, aa/acc" in printed
    noise_header = next(ln for ln in printed.splitlines() if "wrong_value recall" in ln)
    assert noise_header.index("wrong_value recall") < noise_header.index("typo recall")  # config order
    assert comparison_report(tracker.uri, cfg.name, order=order) == printed.rstrip("\n")
    effects = json.loads((tmp_path / "cmp" / "effects.json").read_text())
    m2 = next(e for e in effects if e["family"] == "m2" and e["b"] == "sft" and e["metric"] == "aa/acc")
    assert m2["significant"] and m2["n"] == 3 and m2["confidence"] == 0.95
    assert (tmp_path / "cmp" / "effect_aa__acc.png").read_bytes()[:4] == b"\x89PNG"
    parent = _search(tracker.uri, cfg.name, "tags.`lethe.kind` = 'parent'").iloc[0]
    assert parent["metrics.effect/m2/forget-sft/aa/acc/above_noise"] == 1.0
    assert parent["metrics.noise/m0/noise_kind/typo/auroc"] == 0.95
    assert parent["metrics.compare/m2/forget/aa/acc/mean"] == pytest.approx(0.5 + 0.05 + 0.002 + 0.01 / 3)


def test_compare_headline_average_in_points_on_the_parent(sqlite_tracker, tmp_path, capsys):
    from orchestrator.tracking.compare import CompareOrder, cli_compare

    tracker, cfg, run_dir = sqlite_tracker
    cfg = _log_scripted_pipeline(tracker, cfg, run_dir, tmp_path, benchmarks={
        "A": {"tasks": ["aa"], "metric": "acc"}, "Z": {"tasks": ["zz"], "metric": "f1"}})
    cli_compare(tracker.uri, cfg.name, tmp_path / "cmp", order=CompareOrder.from_config(cfg))
    printed = capsys.readouterr().out
    assert printed.startswith("Headline: average over 2 benchmarks, in points")
    header = printed.splitlines()[1].split()
    assert header == ["seeds", "A", "Z", "average"]
    charts = sorted(p.name for p in (tmp_path / "cmp").glob("*.png"))
    assert charts == ["compare_A.png", "compare_Z.png", "compare_average.png",
                      "effect_A.png", "effect_Z.png", "effect_average.png"]
    assert "m2  forget − sft (3 paired seeds): better beyond the seed noise on A, Z, average" in printed
    parent = _search(tracker.uri, cfg.name, "tags.`lethe.kind` = 'parent'").iloc[0]
    # (acc + acc / 2) / 2 per run, so forget − sft is 0.75 × (0.05 + 0.002) on average
    assert parent["metrics.effect/m2/forget-sft/average/points"] == pytest.approx(100 * 0.75 * 0.052)
    children = _search(tracker.uri, cfg.name, "tags.method = 'forget' and tags.model = 'm2'")
    assert sorted(children["metrics.headline/average"].round(6)) == sorted(
        round(0.75 * (0.5 + n + 0.05 + 0.001 * s), 6)
        for s, n in zip((1, 2, 3), (0.0, 0.03, -0.02), strict=True))


# ------------------------------------------------------------------------ a live server


def test_compare_leaves_no_tracking_uri_behind(tmp_path, monkeypatch):
    """Reading runs must not export MLFLOW_TRACKING_URI: it outranks the config of every later
    run in the process (a leak sent a second pipeline's runs to the first one's store)."""
    import os

    from orchestrator.tracking.compare import compare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    compare(f"sqlite:///{tmp_path}/m.db", "nothing-here")
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
def test_lethe_ui_server_receives_a_run_and_stops_on_sigterm(tmp_path, monkeypatch):
    """`lethe ui`'s MLflow server takes a run logged through MLFLOW_TRACKING_URI (metrics,
    and an artifact proxied into the run directory); the server runs in its own process
    group, and a SIGTERM to the command (a job manager, `timeout`) stops the server too.
    (One server for both: each start costs ~8 s of CPU.)"""
    import signal
    import subprocess
    import sys

    import psutil

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: ui-test\nrun_dir: {tmp_path}/runs\nmodels:\n"
                   "  - {name: m, family: llama, from_config: {hidden_size: 32}}\n")
    lethe = Path(sys.executable).parent / "lethe"
    port = _free_port()
    # The server must serve this config's own store: an MLFLOW_TRACKING_URI left in the
    # environment by an earlier test in the session would win over the config (no
    # tracking_uri here) and `lethe ui` would serve that store instead (seen in full-suite
    # runs: the run landed in another store's experiment 3, its artifact beside that store).
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(lethe), "ui", str(cfg), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    deadline = time.time() + 60
    while server_pid is None and time.time() < deadline:
        line = proc.stdout.readline()
        if m := re.search(r"\(pid (\d+)\)", line):
            server_pid = int(m.group(1))
    try:
        assert server_pid is not None and psutil.pid_exists(server_pid)
        uri = f"http://127.0.0.1:{port}"  # answering: lethe ui prints the pid once it is
        check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        served = _config(name="served")
        tracker = Tracker.open(served, tmp_path / "unused")
        assert tracker.uri == uri
        tracker.start_parent("p", served)
        with tracker.child("c", {"family": "llama", "method": "sft", "seed": 0}) as run:
            run.log_eval_metrics({"mc": {"acc": 0.25}})
            run.log_dict({"ok": True}, "served.json")
        tracker.end_parent()
        runs = _search(uri, "served")
        assert len(runs) == 2 and 0.25 in runs["metrics.eval/mc/acc"].tolist()
        assert list((tmp_path / "runs").rglob("served.json"))  # proxied to the run dir

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(1)
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == "zombie"
    finally:  # never leave a server behind, even when the assertion fails
        proc.kill()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
