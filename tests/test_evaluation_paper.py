"""The paper's five benchmarks through the installed lm-eval's own task code, offline.

The registry tasks read their datasets from the hub, which tests never reach. Here each of
the 13 tasks of configs/paper/llama3.2-1b.yaml is a local YAML that `include`s the installed
registry YAML (its prompts, splits, process_docs / process_results, metrics, generation
settings) and only swaps the dataset for a few local rows shaped like the hub's. A scripted LM
answers, so every score is known in advance: the test checks what Lethe takes from lm-eval
(metric keys, the fraction limit, 1-shot TydiQA drawn from the same language's train split,
greedy generation stopped at a newline) and the headline average built from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.evaluation import evaluate_model

REPO = Path(__file__).resolve().parents[1]
LANGS = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
         "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
# Where lm-eval 0.4.13 keeps each task's YAML (the test checks the `task:` name in it).
REGISTRY = {"truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
            "boolq": "super_glue/boolq/default.yaml", "logiqa": "logiqa/logiqa.yaml",
            "asdiv": "asdiv/default.yaml",
            **{f"tydiqa_goldp_{c}": f"tydiqa/tydiqa_goldp_{c}.yaml" for c in LANGS}}
ANSWER = "alpha beta"  # what the scripted LM generates for every TydiQA question


def _rows() -> dict[str, dict[str, list[dict]]]:
    """{task: {split: rows}} shaped like the hub datasets the registry YAMLs read."""
    mc2 = ([1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0])  # MC2 = share of true choices
    truthfulqa = [{"question": f"Question {i}?",
                   "mc1_targets": {"choices": ["aa", "bb"], "labels": [1, 0]},
                   "mc2_targets": {"choices": ["aa", "bb", "cc", "dd"], "labels": labels}}
                  for i, labels in enumerate(mc2)]
    # 101 rows: limit 0.99 keeps ceil(0.99 * 101) = 100; every 4th is "no" (label 0)
    boolq = [{"passage": f"Passage {i}.", "question": f"is it {i}", "label": int(i % 4 != 0),
              "idx": i} for i in range(101)]
    logiqa = [{"context": f"Context {i}.", "question": f"Which {i}?", "label": gold,
               "options": ["x", "yy", "zzz", "wwww"]} for i, gold in enumerate("abac")]
    asdiv = [{"body": f"Body {i}.", "question": f"How many {i}?", "answer": answer,
              "solution_type": "x", "formula": "x"}
             for i, answer in enumerate(["7 (apples)", "3 (pears)", "7 (cars)", "2 (dogs)"])]

    def tydi(lang: str, name: str, split: str, k: int, answer: str) -> dict:
        return {"id": f"{name}-{split}-{k}", "title": f"Title {lang} {k}",
                "context": f"{split.upper()}-{lang}-{k} passage",
                "question": f"{split} question {lang} {k}",
                "answers": {"text": [answer], "answer_start": [0]}}

    val, train = [], []
    for i, (lang, name) in enumerate(LANGS.items()):
        # F1 of "alpha beta": 1 against itself; 2/3 against "alpha"; 0 against "gamma"
        val += [tydi(lang, name, "val", 0, ANSWER),
                tydi(lang, name, "val", 1, "alpha" if i % 2 == 0 else "gamma")]
        train += [tydi(lang, name, "train", k, f"answer {k}") for k in range(3)]
    return {"truthfulqa_mc2": {"validation": truthfulqa},
            "boolq": {"train": boolq[:4], "validation": boolq},
            "logiqa": {"train": logiqa, "validation": logiqa, "test": logiqa},
            "asdiv": {"validation": asdiv},
            **{f"tydiqa_goldp_{c}": {"train": train, "validation": val} for c in LANGS}}


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
    """A folder of local task YAMLs: each includes the registry YAML, data swapped."""
    import lm_eval

    registry = Path(lm_eval.__file__).parent / "tasks"
    out = tmp_path / "tasks"
    out.mkdir()
    for task, splits in _rows().items():
        source = registry / REGISTRY[task]
        assert re.search(rf"^task: {task}$", source.read_text(), re.M), f"{source}: not {task}"
        files = {}
        for split, rows in splits.items():
            files[split] = str(out / f"{task}.{split}.jsonl")
            Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"{task}.yaml").write_text(yaml.safe_dump({
            "include": str(source), "task": task, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}))
    return out


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
