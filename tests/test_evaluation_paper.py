"""The paper's five benchmarks through the installed lm-eval's own task code, offline.

The registry tasks read their datasets from the hub, which tests never reach. Here each of
the 13 tasks of configs/paper/llama3.2-1b.yaml is a local YAML that `include`s the task
definition the evaluation resolves (the installed registry YAML: prompts, splits,
process_docs / process_results, metrics, generation settings; for LogiQA, Lethe's override
in configs/eval/lm_eval_tasks) and only swaps the dataset for a few local rows shaped like
the hub's (tests/paper_eval_rows.py). A scripted LM answers, so every score is known in
advance: the test checks what Lethe takes from lm-eval (metric keys, the fraction limit,
1-shot TydiQA drawn from the same language's train split, greedy generation stopped at a
newline) and the headline average built from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from paper_eval_rows import ANSWER, LANGS, write_paper_tasks

from orchestrator.config import load_config
from orchestrator.evaluation import evaluate_model

REPO = Path(__file__).resolve().parents[1]

EXPECTED = {
    "truthfulqa": (0.5 + 0.25 + 0.75 + 0.25) / 4,
    "boolq": 0.25,  # the scripted LM prefers the shorter " no"; rows 0..99, 25 of them "no"
    "logiqa": 0.5,  # the shortest option (a) is gold in 2 of 4
    "tydiqa": sum((1 + 2 / 3) / 2 if i % 2 == 0 else 0.5 for i in range(9)) / 9,
    "asdiv": 0.5,  # greedy continuation "7" right in 2 of 4
}


class _ScriptedLM:
    """An lm-eval LM with fixed habits: the shorter continuation is likelier, "7" is its
    greedy answer, and it generates "alpha beta" (and more after a newline). It records
    every generation request."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class Scripted(LM):
            def __init__(self):
                super().__init__()
                self.generations: list[tuple[str, dict]] = []

            def loglikelihood(self, requests):
                return [(-float(len(r.args[1])), r.args[1].strip() == "7") for r in requests]

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

            def generate_until(self, requests):
                self.generations += [(r.args[0], dict(r.args[1])) for r in requests]
                return [f" {ANSWER}" for _ in requests]

        return Scripted()


@pytest.fixture
def paper_tasks_offline(tmp_path: Path) -> Path:
    """A folder of local task YAMLs: each includes the definition the evaluation resolves
    (Lethe's LogiQA override, lm-eval's registry YAML for the rest), data swapped."""
    return write_paper_tasks(tmp_path / "tasks")


def test_paper_benchmarks_through_lm_eval_task_code(paper_tasks_offline, tmp_path, monkeypatch):
    from orchestrator.evaluation import runner
    from orchestrator.evaluation.benchmarks import benchmark_scores, flatten_metrics

    lm = _ScriptedLM()
    monkeypatch.setattr(runner, "load_hf_lm", lambda *a, **k: (lm, {"pretrained": "scripted"}))
    cfg = load_config(REPO / "configs/paper/llama3.2-1b.yaml", ["evaluate.num_gpus=0"]).evaluate
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    metrics = evaluate_model(str(model_dir), cfg, str(paper_tasks_offline))

    # The metric keys lm-eval reports ("acc,none", "f1,none": no filters) as Lethe logs them
    assert metrics["truthfulqa_mc2"] == {"acc": pytest.approx(EXPECTED["truthfulqa"])}
    assert metrics["boolq"] == {"acc": 0.25}
    assert set(metrics["logiqa"]) == {"acc", "acc_norm"} and metrics["logiqa"]["acc"] == 0.5
    assert metrics["asdiv"] == {"acc": 0.5}
    assert all(set(metrics[f"tydiqa_goldp_{c}"]) == {"exact_match", "f1"} for c in LANGS)
    assert metrics["tydiqa_goldp_en"] == {"exact_match": 0.5, "f1": pytest.approx(5 / 6)}
    assert metrics["tydiqa_goldp_bn"] == {"exact_match": 0.5, "f1": 0.5}

    raw = json.loads((model_dir / "eval_results.json").read_text())["lm_eval"]
    # limit 0.99 is a fraction (100 of boolq's 101 rows); TydiQA 1-shot, the rest 0-shot
    assert raw["n-samples"]["boolq"] == {"original": 101, "effective": 100}
    assert raw["n-samples"]["tydiqa_goldp_sw"] == {"original": 2, "effective": 2}
    assert raw["n-shot"] == {t: int(t.startswith("tydiqa")) for t in cfg.tasks}
    assert [(c["num_fewshot"], c["limit"]) for c in raw["calls"]] == [(0, 0.99), (1, 100)]

    # TydiQA: greedy, stopped at a newline; one demonstration from the same language's train
    # split (lm-eval filters the train split with the task's process_docs), whole passages
    assert len(lm.generations) == 18
    for context, kwargs in lm.generations:
        assert "\n" in kwargs["until"] and kwargs["do_sample"] is False
        lang = re.search(r"VAL-(\w\w)-\d passage", context).group(1)
        assert re.findall(r"TRAIN-(\w\w)-\d passage", context) == [lang], context

    head = benchmark_scores(flatten_metrics(metrics), cfg.benchmarks)
    assert head == pytest.approx({**EXPECTED, "average": sum(EXPECTED.values()) / 5})
