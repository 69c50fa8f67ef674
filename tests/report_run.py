"""A finished pipeline run fabricated for the report tests (no pipeline run): a sqlite MLflow
store with a parent and its children, timeline.json and resolved_config.yaml. conftest's
session fixture `report_page` builds it once for tests/test_report*.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from orchestrator.config import ExperimentConfig, save_config
from orchestrator.method.partition import partition_global, partition_stats
from orchestrator.tracking import Tracker
from orchestrator.tracking.inspect import render_html
from orchestrator.tracking.report_data import run_root

SEEDS = (0, 1, 2)
METHODS = ("sft", "ignore", "forget")


def report_config(tmp_path: Path, **extra) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "report-test", "run_dir": str(tmp_path / "runs"), "seeds": list(SEEDS),
        "models": [{"name": n, "family": f, "tokenizer_vocab_size": 320,
                    "from_config": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}}
                   for n, f in (("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"))],
        "train": {"methods": list(METHODS)},
        "evaluate": {"tasks": ["lethe_synth_mc"]},
        **extra,
    })


def _inspector_page(sample_id: int) -> str:
    words = ["Q", ":", " 2", "+", "2", "?", " The", " answer", " is", " 5", "."]
    return render_html([{"index": i, "id": i, "text": w, "is_response": i >= 6,
                         "score": (0.8 - 0.3 * i) if i >= 6 else float("nan"),
                         "class": (1 if i != 9 else -1) if i >= 6 else 0, "noise": i == 9}
                        for i, w in enumerate(words)], sample_id)


def _log_curves(run, curves: dict[str, list[float]]) -> None:
    """A whole metric history in one request (steps 1..n), as training's reports leave it."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.client.log_batch(run.run_id, metrics=[Metric(k, v, now, i + 1) for k, vals in curves.items()
                                              for i, v in enumerate(vals)])


def fabricate_run(tmp_path: Path) -> ExperimentConfig:
    """A finished pipeline run as the pipeline leaves it: parent + children in a sqlite
    store (eval metrics, curves, partition stats and inspector pages), timeline.json and
    resolved_config.yaml in the run directory."""
    cfg = report_config(tmp_path)
    root = run_root(cfg)
    root.mkdir(parents=True)
    save_config(cfg, root / "resolved_config.yaml")
    tracker = Tracker.open(cfg, root)
    parent = tracker.start_parent("pipeline-test", cfg)
    rng = np.random.default_rng(0)
    for k, spec in enumerate(cfg.models):
        fam = {"family": spec.family, "model": spec.name}
        scores = rng.normal(0.3, 1.0, 4000).astype(np.float32)
        noise = (rng.random(4000) < 0.08) & (scores < 0.5)
        stats = partition_stats(scores, partition_global(scores, 0.7), noise.astype(np.int8), bins=40)
        stats.update(mode="global", rho=0.7, noise_by_kind={
            "filler": {"n_noise": 120, "recall": 0.61, "auroc": 0.72},
            "typo": {"n_noise": 90, "recall": 0.44, "auroc": 0.66}})
        with tracker.child(f"{spec.name}/partition", {**fam, "seed": "-",
                                                      "lethe.stage": "partition"}) as run:
            run.log_partition_stats(stats)
            run.log_metrics({f"partition/noise_kind/{kind}/{m}": v
                             for kind, s in stats["noise_by_kind"].items() for m, v in s.items()})
            for sid in (3, 7):
                run.log_text(_inspector_page(sid), f"inspect/sample_{sid}.html")
        with tracker.child(f"{spec.name}/reference", {**fam, "seed": 0,
                                                      "lethe.stage": "reference"}) as run:
            _log_curves(run, {"pos_loss": [5.0 / step for step in range(1, 6)]})
        with tracker.child(f"{spec.name}/base", {**fam, "method": "base", "seed": 0}) as run:
            run.log_eval_metrics({"lethe_synth_mc": {"acc": 0.25, "acc_norm": 0.24}})
        for m, method in enumerate(METHODS):
            for seed in SEEDS:
                with tracker.child(f"{spec.name}/{method}/s{seed}",
                                   {**fam, "method": method, "seed": seed}) as run:
                    acc = 0.30 + 0.04 * m + 0.02 * k + 0.005 * seed
                    run.log_eval_metrics({"lethe_synth_mc": {"acc": acc, "acc_norm": acc - 0.02}})
                    steps = range(1, 11)
                    lam = [0.25 * s / 10 if method == "forget" else 0.0 for s in steps]
                    curves = {"pos_loss": [4.0 / s + 0.1 * seed for s in steps], "lambda": lam}
                    if method == "forget":
                        curves["neg_loss"] = [4.5 / s + la for s, la in zip(steps, lam, strict=True)]
                    _log_curves(run, curves)
    parent.log_metrics({"pipeline_wall_s": 61.5})
    tracker.end_parent()
    t0 = 1_700_000_000.0  # the lead's timeline.json: {"start", "summary", "spans": [...]}
    spans = [{"stage": "ray-init", "model": "-", "category": "startup", "start": t0, "end": t0 + 4}]
    for k, spec in enumerate(cfg.models):
        off = t0 + 4 + k
        spans += [
            {"stage": "tokens", "model": spec.name, "category": "data", "start": off, "end": off + 2},
            {"stage": "reference", "model": spec.name, "category": "startup",
             "start": off + 2, "end": off + 6},
            {"stage": "reference", "model": spec.name, "category": "compute",
             "start": off + 6, "end": off + 15},
            {"stage": "train", "model": spec.name, "category": "compute",
             "start": off + 20, "end": off + 40},
            {"stage": "train", "model": spec.name, "category": "export",
             "start": off + 40, "end": off + 42}]
    (root / "timeline.json").write_text(json.dumps({"start": t0, "spans": spans}))
    return cfg
