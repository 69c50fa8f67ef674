"""The paper's five benchmarks on scripted lm-eval results: the task set and its shots, the
per-benchmark merge and average, the headline table, and `lethe compare` printing it.

lm-eval on local task YAMLs (a tiny model, a scripted LM, the Ray wrapper) is in
tests/test_evaluation_local.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.config import EvaluateConfig
from orchestrator.evaluation import evaluate_model

REPO = Path(__file__).resolve().parents[1]
TYDIQA = [f"tydiqa_goldp_{lang}" for lang in ("ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te")]
TYDIQA_F1 = dict(zip(TYDIQA, (0.30, 0.20, 0.50, 0.40, 0.45, 0.25, 0.35, 0.30, 0.15), strict=True))
# What lm-eval 0.4.13 returns per task (metric,filter keys), scripted.
SCRIPTED = {
    "truthfulqa_mc2": {"alias": "truthfulqa_mc2", "acc,none": 0.40, "acc_stderr,none": "N/A"},
    "boolq": {"alias": "boolq", "acc,none": 0.70},
    "logiqa": {"alias": "logiqa", "acc,none": 0.25, "acc_norm,none": 0.28},
    "asdiv": {"alias": "asdiv", "acc,none": 0.10},
    **{t: {"alias": t, "f1,none": f1, "exact_match,none": f1 / 2} for t, f1 in TYDIQA_F1.items()},
}
PAPER_AVERAGE = (0.40 + 0.70 + 0.25 + sum(TYDIQA_F1.values()) / 9 + 0.10) / 5
SHIFT = {"by": 0.0}  # added to every scripted score (scripted_lm_eval)


def paper_eval_config() -> EvaluateConfig:
    return EvaluateConfig.model_validate(
        yaml.safe_load((REPO / "configs/eval/paper_tasks.yaml").read_text()))


@pytest.fixture
def scripted_lm_eval(monkeypatch):
    """lm_eval.simple_evaluate replaced by a recorder that answers from SCRIPTED (registry
    tasks need the hub, so they are never run offline)."""
    import lm_eval

    from orchestrator.evaluation import runner

    calls: list[dict] = []
    SHIFT["by"] = 0.0

    def shifted(res: dict) -> dict:  # every score moved by SHIFT (a method's gain, a seed's noise)
        return {k: v + SHIFT["by"] if isinstance(v, float) else v for k, v in res.items()}

    def fake_simple_evaluate(*, model, tasks, num_fewshot, limit, **kwargs):
        calls.append({"tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit,
                      "seeds": {k: v for k, v in kwargs.items() if k.endswith("seed")}})
        return {"results": {t: shifted(SCRIPTED[t]) for t in tasks},
                "n-shot": {t: num_fewshot for t in tasks},
                "versions": {t: 1.0 for t in tasks},
                "n-samples": {t: {"original": 100, "effective": 100} for t in tasks},
                "higher_is_better": {t: {} for t in tasks}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    monkeypatch.setattr(runner, "build_task_manager", lambda tasks, include: None)
    monkeypatch.setattr(runner, "load_hf_lm", lambda model_dir, cfg, device, revision=None: (object(), {
        "pretrained": model_dir}))
    return calls


def test_paper_task_set_has_five_benchmarks_with_their_shots():
    cfg = paper_eval_config()
    assert list(cfg.benchmarks) == ["truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv"]
    assert cfg.benchmarks["tydiqa"].tasks == TYDIQA and cfg.benchmarks["tydiqa"].metric == "f1"
    assert all(cfg.num_fewshot[t] == 1 for t in TYDIQA)
    assert all(cfg.num_fewshot[t] == 0 for t in ("truthfulqa_mc2", "boolq", "logiqa", "asdiv"))
    assert cfg.limit == 0.99 and cfg.seed == 42
    assert all(cfg.task_limit[t] == 100 for t in TYDIQA)
    # the five paper configs carry the same evaluation (only resources differ; the offline
    # smoke config evaluates the synthetic corpus's tasks)
    paths = [p for p in sorted((REPO / "configs/paper").glob("*.yaml"))
             if not p.name.startswith("smoke")]
    assert len(paths) >= 5, paths  # the paper's five models, at least
    for path in paths:
        from orchestrator.config import load_config

        ev = load_config(path).evaluate
        for key in ("tasks", "num_fewshot", "limit", "task_limit", "seed", "benchmarks"):
            assert getattr(ev, key) == getattr(cfg, key), f"{path.name}: evaluate.{key}"


def test_paper_evaluation_calls_shots_merge_and_average(scripted_lm_eval, tmp_path):
    from orchestrator.evaluation.benchmarks import benchmark_scores, flatten_metrics

    cfg = paper_eval_config()
    metrics = evaluate_model(str(tmp_path), cfg, None)
    # one lm-eval call per (shots, limit): the 0-shot fraction-limited four, then TydiQA
    assert [c["tasks"] for c in scripted_lm_eval] == [
        ["truthfulqa_mc2", "boolq", "logiqa", "asdiv"], TYDIQA]
    assert [(c["num_fewshot"], c["limit"]) for c in scripted_lm_eval] == [(0, 0.99), (1, 100)]
    assert all(c["seeds"] == {"random_seed": 42, "numpy_random_seed": 42,
                              "torch_random_seed": 42, "fewshot_random_seed": 42}
               for c in scripted_lm_eval)
    # merged per model: every task of both calls, metrics without the filter suffix
    assert list(metrics) == cfg.tasks
    assert metrics["logiqa"] == {"acc": 0.25, "acc_norm": 0.28}
    assert metrics["tydiqa_goldp_en"] == {"f1": 0.50, "exact_match": 0.25}
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["lm_eval"]["n-shot"] == {t: (1 if t in TYDIQA else 0) for t in cfg.tasks}
    assert [c["limit"] for c in saved["lm_eval"]["calls"]] == [0.99, 100]
    head = benchmark_scores(flatten_metrics(metrics), cfg.benchmarks)
    assert head["tydiqa"] == pytest.approx(sum(TYDIQA_F1.values()) / 9)
    assert head["average"] == pytest.approx(PAPER_AVERAGE)
    # a missing language is not averaged over the others
    partial = flatten_metrics({k: v for k, v in metrics.items() if k != "tydiqa_goldp_sw"})
    assert benchmark_scores(partial, cfg.benchmarks)["average"] is None


def test_limit_forms_and_unknown_task_names():
    assert EvaluateConfig(limit=0.99).limit == 0.99
    assert EvaluateConfig(limit=100).limit == 100 and EvaluateConfig(limit=5.0).limit == 5
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="neither a count >= 1 nor a fraction"):
            EvaluateConfig(limit=bad)
    with pytest.raises(ValueError, match="task 'boolqq' is not in evaluate.tasks"):
        EvaluateConfig(tasks=["boolq"], num_fewshot={"boolqq": 0})
    with pytest.raises(ValueError, match="benchmarks.b.tasks: task 'x'"):
        EvaluateConfig(tasks=["boolq"], benchmarks={"b": {"tasks": ["x"], "metric": "acc"}})


def test_headline_compare_table_on_scripted_results():
    import pandas as pd

    from orchestrator.config import load_config
    from orchestrator.tracking.compare import CompareOrder, headline_table, report_text

    cfg = load_config(REPO / "configs/paper/llama3.2-1b.yaml")
    flat = {f"{t}/{m.split(',')[0]}": v for t, res in SCRIPTED.items()
            for m, v in res.items() if isinstance(v, float)}
    rows = []
    for seed, (shift, jitter) in enumerate(((0.0, 0.001), (0.02, -0.002), (-0.01, 0.001))):
        for method, gain in (("sft", 0.0), ("ignore", 0.02), ("forget", 0.0449)):
            delta = shift + gain + (jitter if method == "forget" else 0.0)
            rows.append({"family": "llama3.2-1b", "method": method, "seed": str(42 + seed),
                         **{k: v + delta for k, v in flat.items()}})
    runs = pd.DataFrame(rows)
    order = CompareOrder.from_config(cfg)
    table = headline_table(runs, order)
    assert list(table.columns) == ["seeds", "truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv",
                                   "average"]
    sft_avg = 100 * (PAPER_AVERAGE + (0.0 + 0.02 - 0.01) / 3)
    assert table.loc[("llama3.2-1b", "sft"), "average"].startswith(f"{sft_avg:.2f} ± ")
    text = report_text(runs, pd.DataFrame(), order)
    assert "Headline: average over 5 benchmarks, in points" in text
    line = next(ln for ln in text.splitlines() if "forget − sft" in ln)
    assert "+4.49" in line and line.rstrip().endswith("*")  # consistent gain: above the noise
    print(text)


def test_validate_lists_the_five_benchmarks_with_shots(capsys):
    from orchestrator.cli import main

    assert main(["validate", str(REPO / "configs/paper/llama3.2-1b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "# evaluate: headline: average over 5 benchmarks:" in out
    for line in ("truthfulqa: acc (truthfulqa_mc2), 0-shot", "boolq: acc (boolq), 0-shot",
                 "logiqa: acc (logiqa), 0-shot", "tydiqa: f1 (mean over 9 tasks), 1-shot",
                 "asdiv: acc (asdiv), 0-shot",
                 "call 1: 0-shot, limit 0.99 (fraction): truthfulqa_mc2, boolq, logiqa, asdiv",
                 "call 2: 1-shot, limit 100 per task: tydiqa_goldp_ar"):
        assert line in out
    yaml.safe_load(out)  # the listing is YAML comments: the output is still a config


def test_lethe_compare_cli_prints_the_paper_headline(scripted_lm_eval, tmp_path, monkeypatch, capsys):
    """`lethe compare configs/paper/llama3.2-1b.yaml` on a store the pipeline's own code filled:
    scripted lm-eval results (the base model; sft and forget x the config's 3 seeds) go
    through evaluate_model, PipelineTracking.log_eval and the run's end (the comparison on
    the parent run), then the CLI prints the headline with the five-benchmark average."""
    import math

    import mlflow

    from orchestrator.cli import main
    from orchestrator.config import load_config
    from orchestrator.pipeline.run import run_dir
    from orchestrator.pipeline.tracking_glue import PipelineTracking
    from orchestrator.tracking.compare import _tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs/paper/llama3.2-1b.yaml"
    overrides = [f"run_dir={tmp_path / 'runs'}", "evaluate.num_gpus=0"]  # scripted, on CPU
    cfg = load_config(config, overrides)
    assert cfg.seeds == [42, 43, 44] and cfg.models[0].name == "llama3.2-1b"
    root = run_dir(cfg)
    track = PipelineTracking.open(cfg, root)
    track.start(cfg, config, "pipeline-scripted")
    noise = dict(zip(cfg.seeds, (0.0, 0.03, -0.02), strict=True))  # what a seed does to both methods
    jitter = dict(zip(cfg.seeds, (0.001, -0.002, 0.001), strict=True))
    shifts = {"llama3.2-1b/base/-": -0.05}
    for seed in cfg.seeds:
        shifts[f"llama3.2-1b/sft/s{seed}"] = noise[seed]
        shifts[f"llama3.2-1b/forget/s{seed}"] = noise[seed] + 0.04 + jitter[seed]
    results, dirs = {}, {}
    for label, shift in shifts.items():
        SHIFT["by"] = shift
        dirs[label] = tmp_path / "models" / label.replace("/", "_")
        dirs[label].mkdir(parents=True)
        results[label] = evaluate_model(str(dirs[label]), cfg.evaluate, None)
    assert len(scripted_lm_eval) == 2 * len(shifts)  # two lm-eval calls per model
    track.log_eval(results, dirs)
    track.finish(wall_s=1.0)

    assert main(["compare", str(config), *overrides]) == 0
    printed = capsys.readouterr().out
    print(printed)  # `pytest -s` shows what `lethe compare` prints
    lines = printed.splitlines()
    assert lines[0] == ("Headline: average over 5 benchmarks, in points (100 × metric), "
                        "mean ± std over seeds:")
    assert lines[1].split() == ["seeds", "truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv",
                                "average"]

    def cell(values: list[float]) -> str:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    per_method = {m: [PAPER_AVERAGE + shifts[f"llama3.2-1b/{m}/s{s}"] for s in cfg.seeds]
                  for m in ("sft", "forget")}
    # rows: "llama3.2-1b base 1 ..." then "sft 3 ..." (the family printed once)
    rows = {ln.removeprefix("llama3.2-1b").split()[0]: ln.removeprefix("llama3.2-1b").split()
            for ln in lines[3:6]}
    assert list(rows) == ["base", "sft", "forget"]
    assert rows["base"][1] == "1" and rows["base"][-3:] == f"{100 * (PAPER_AVERAGE - 0.05):.2f} ± -".split()
    for method, values in per_method.items():
        assert rows[method][1] == "3", rows[method]  # seeds
        assert " ".join(rows[method][-3:]) == cell(values), rows[method]
    # forget − sft in points, paired over the seeds: 0.04 + mean jitter (0) = +4.00 on each
    # benchmark and on the average, above the seed noise (the jitter is small)
    diff = next(ln for ln in lines if "forget − sft" in ln and "[" in ln)
    assert diff.count("+4.00 [") == 6 and diff.rstrip().endswith("*"), diff
    assert "llama3.2-1b  forget − sft (3 paired seeds): better beyond the seed noise on " \
           "truthfulqa, boolq, logiqa, tydiqa, asdiv, average" in printed

    # The parent run carries the same headline: mean and spread per method, forget − sft in points
    with _tracking_uri(track.tracker.uri):
        runs = mlflow.search_runs(experiment_names=[cfg.name], output_format="pandas")
    parent = runs[runs["tags.lethe.kind"] == "parent"].iloc[0]
    key = "metrics.compare/llama3.2-1b/forget/average"
    assert parent[f"{key}/mean"] == pytest.approx(sum(per_method["forget"]) / 3)
    assert f"{100 * parent[f'{key}/std']:.2f}" == cell(per_method["forget"]).split(" ± ")[1]
    assert parent["metrics.effect/llama3.2-1b/forget-sft/average/points"] == pytest.approx(4.0)
    assert parent["metrics.effect/llama3.2-1b/forget-sft/tydiqa/above_noise"] == 1.0
    child = runs[runs["tags.mlflow.runName"] == "llama3.2-1b/forget/s43"].iloc[0]
    assert child["metrics.headline/average"] == pytest.approx(PAPER_AVERAGE + 0.03 + 0.04 - 0.002)
    assert child["metrics.eval/tydiqa_goldp_en/f1"] == pytest.approx(0.50 + 0.03 + 0.04 - 0.002)


def test_a_benchmark_metric_lm_eval_did_not_report_is_named(scripted_lm_eval, tmp_path, caplog):
    """A metric the tasks did not report (here as if TydiQA had a second filter): warned at
    evaluation, blank headline; lm-eval's raw `f1,none` key is refused by the config."""
    from orchestrator.evaluation.benchmarks import (
        benchmark_scores,
        flatten_metrics,
        missing_benchmark_metrics,
    )

    data = yaml.safe_load((REPO / "configs/eval/paper_tasks.yaml").read_text())
    data["benchmarks"]["tydiqa"]["metric"] = "f1,none"
    with pytest.raises(ValueError, match="without lm-eval's ',<filter>' suffix \\('f1'"):
        EvaluateConfig.model_validate(data)
    data["benchmarks"]["tydiqa"]["metric"] = "f1_remove_whitespace"
    cfg = EvaluateConfig.model_validate(data)
    with caplog.at_level("WARNING", logger="orchestrator.evaluation.runner"):
        metrics = evaluate_model(str(tmp_path), cfg, None)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 9 and all("that benchmark and the average stay blank" in w for w in warned)
    assert ("evaluate.benchmarks.tydiqa: task tydiqa_goldp_ar reported no 'f1_remove_whitespace' "
            "(it reported: exact_match, f1)") in warned[0]
    assert benchmark_scores(flatten_metrics(metrics), cfg.benchmarks)["average"] is None
    assert missing_benchmark_metrics(metrics, paper_eval_config().benchmarks) == []
    assert missing_benchmark_metrics({}, {"b": {"tasks": ["t"], "metric": "acc"}}) == [
        "evaluate.benchmarks.b: task t has no results"]
