"""Local rows for the paper's 13 lm-eval tasks, and task folders that run them offline.

The tasks read hub datasets, which tests never reach. `write_paper_tasks` writes a folder of
task YAMLs, one per task, each `include`-ing the task definition an evaluation resolves
(Lethe's override in configs/eval/lm_eval_tasks where one exists, else lm-eval's registry
YAML: prompts, splits, process_docs / process_results, metrics, generation settings) and
swapping only its data for local files shaped like the hub's (for LogiQA, the source text
files its override parses). Pass the folder as `evaluate.include_path` (it is indexed after
the overrides, so its tasks win). `write_registry_tasks` does the same with lm-eval's own
definitions only, which for LogiQA means the rows its loading script yielded.

Reused by tests/test_evaluation_paper.py (scores through a scripted LM),
tests/test_eval_overrides.py (override vs registry, request by request) and any rehearsal
that runs configs/paper/*.yaml with the 13 tasks on local rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.evaluation.task_data import OVERRIDES_DIR, overridden_tasks

LANGS = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
         "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
# Where lm-eval 0.4.13 keeps each task's YAML (checked: the `task:` name in it).
REGISTRY = {"truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
            "boolq": "super_glue/boolq/default.yaml", "logiqa": "logiqa/logiqa.yaml",
            "asdiv": "asdiv/default.yaml",
            **{f"tydiqa_goldp_{c}": f"tydiqa/tydiqa_goldp_{c}.yaml" for c in LANGS}}
PAPER_TASKS = list(REGISTRY)
ANSWER = "alpha beta"  # what test_evaluation_paper's scripted LM generates for TydiQA


def paper_rows() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{task: {split: rows}} shaped like the rows lm-eval reads for each task (for LogiQA:
    the rows EleutherAI/logiqa's script yielded, which `logiqa_source_text` writes back as
    the source files' text)."""
    mc2 = ([1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0])  # MC2 = share of true choices
    truthfulqa = [{"question": f"Question {i}?",
                   "mc1_targets": {"choices": ["aa", "bb"], "labels": [1, 0]},
                   "mc2_targets": {"choices": ["aa", "bb", "cc", "dd"], "labels": labels}}
                  for i, labels in enumerate(mc2)]
    # 101 rows: limit 0.99 keeps ceil(0.99 * 101) = 100; every 4th is "no" (label 0)
    boolq = [{"passage": f"Passage {i}.", "question": f"is it {i}", "label": int(i % 4 != 0),
              "idx": i} for i in range(101)]
    logiqa = [{"label": gold, "context": f"Context {i}.", "question": f"Which {i}?",
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


def logiqa_source_text(rows: list[dict[str, Any]]) -> str:
    """LogiQA rows (as the loading script yielded them) -> the text of a source file
    (github.com/lgw863/LogiQA-dataset): a blank line, then per question its letter, passage,
    question and "A.option" lines, sentences glued as there ("a. B" is written "a.B"; the
    script's normalisation puts the space back). A field no source text could give (one
    with a "." not followed by exactly one space, or padded) is refused."""
    def source(field: str) -> str:
        text = field.replace(". ", ".")
        if text.replace(".", ". ").strip() != field:
            raise ValueError(f"{field!r}: no LogiQA source line normalises to it (the script "
                             "puts one space after every '.' and strips the ends)")
        return text

    blocks = []
    for row in rows:
        options = [f"{letter}.{source(text)}" for letter, text in zip("ABCD", row["options"], strict=False)]
        blocks.append("\n".join([row["label"], source(row["context"]), source(row["question"]),
                                 *options]))
    return "\n" + "\n\n".join(blocks) + "\n"


def registry_yaml(task: str) -> Path:
    """lm-eval's own YAML of a paper task (its `task:` line checked)."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / REGISTRY[task]
    if not re.search(rf"^task: {task}$", path.read_text(), re.M):
        raise AssertionError(f"{path}: not the YAML of {task}")
    return path


def _write_rows(out: Path, task: str, splits: dict[str, list[dict]]) -> dict[str, str]:
    files = {}
    for split, rows in splits.items():
        files[split] = str(out / f"{task}.{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def _write_logiqa_text(out: Path, splits: dict[str, list[dict]]) -> dict[str, str]:
    files = {}
    for split, rows in splits.items():
        files[split] = str(out / f"logiqa.{split}.txt")
        Path(files[split]).write_text(logiqa_source_text(rows))
    return files


def _task_yaml(out: Path, task: str, source: Path, data: dict[str, Any]) -> None:
    (out / f"{task}.yaml").write_text(yaml.safe_dump({"include": str(source), "task": task,
                                                      **data}, sort_keys=False))


def write_paper_tasks(out_dir: str | Path, rows: dict[str, dict[str, list[dict]]] | None = None,
                      tasks: list[str] | None = None) -> Path:
    """A folder of task YAMLs for `tasks` (default: the 13), each the definition an
    evaluation resolves with its data swapped for local `rows` (default `paper_rows()`);
    returns the folder (an include_path). Overrides are included from the repository's
    configs/eval/lm_eval_tasks as shipped; only their dataset_kwargs' data_files change."""
    rows = rows or paper_rows()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overridden = overridden_tasks()
    for task in tasks or PAPER_TASKS:
        if task in overridden:
            shipped = OVERRIDES_DIR / f"{task}.yaml"
            kwargs = yaml.safe_load(shipped.read_text().replace("!function", "")).get(
                "dataset_kwargs") or {}
            if task != "logiqa":
                raise NotImplementedError(f"no local-rows writer for override {task}")
            files = _write_logiqa_text(out, rows[task])
            _task_yaml(out, task, shipped, {"dataset_kwargs": {**kwargs, "data_files": files}})
        else:
            files = _write_rows(out, task, rows[task])
            _task_yaml(out, task, registry_yaml(task), {
                "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": files}})
    return out


def write_registry_tasks(out_dir: str | Path, rows: dict[str, dict[str, list[dict]]] | None = None,
                         tasks: list[str] | None = None) -> Path:
    """As `write_paper_tasks`, with lm-eval's registry definitions only (no override)."""
    rows = rows or paper_rows()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks or PAPER_TASKS:
        files = _write_rows(out, task, rows[task])
        _task_yaml(out, task, registry_yaml(task), {
            "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}})
    return out
