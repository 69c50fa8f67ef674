"""Lethe's lm-eval task overrides (configs/eval/lm_eval_tasks) against lm-eval's own tasks.

An override reads a script-free copy of a dataset whose hub copy needs a loading script
(datasets 5.x refuses those). Here each override and lm-eval's registry task run on the same
local rows (the override on the source files it parses, the registry task on the rows the
loading script yielded from them) and must build the same requests (prompts, few-shot
contexts, choices, targets) and report the same metric keys. The guard test resolves every
task of the shipped paper configs as the evaluation does and fails on a hub dataset that is
neither recorded as script-free nor replaced by an override. No hub access anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from paper_eval_rows import (
    PAPER_TASKS,
    logiqa_source_text,
    registry_yaml,
    write_paper_tasks,
    write_registry_tasks,
)

from orchestrator.config import load_config
from orchestrator.evaluation import task_data
from orchestrator.evaluation.runner import build_task_manager

REPO = Path(__file__).resolve().parents[1]
LOGIQA_COMMIT = "ff6c4cbca47627b3ac2da94a29fa28204a167b41"


def _logiqa_rows() -> dict[str, list[dict]]:
    """Rows as the loading script yielded them, with what its normalisation touches: glued
    sentences ("a.B" -> "a. B"), a decimal ("3.5" -> "3. 5"), padding stripped, and each
    gold letter once (the few-shot split has other rows than the evaluated one)."""
    rows = [{"label": gold, "context": f"Passage {i}. Second sentence {i}.",
             "question": f"Which option {i} follows?",
             "options": [f"First {i}", f"Second {i}. More", "Third 3. 5 kg", "Fourth"]}
            for i, gold in enumerate("abcd")]
    return {"train": rows[1:] + rows[:1], "validation": rows[2:], "test": rows}


def _raw_logiqa_text(rows: list[dict]) -> str:
    """The same rows as the source files write them: no space after a full stop, padding."""
    def squeeze(text: str) -> str:
        return text.replace(". ", ".")
    out = []
    for row in rows:
        options = [f"{k}.{squeeze(o)}  " for k, o in zip("ABCD", row["options"], strict=True)]
        out.append("\n".join([f"{row['label']} ", f"  {squeeze(row['context'])}",
                              squeeze(row["question"]), *options]))
    return "\n" + "\n\n".join(out) + "\n"


def _load(include: Path, task: str):
    from lm_eval.tasks import TaskManager, get_task_dict

    return get_task_dict([task], TaskManager(include_path=str(include),
                                             include_defaults=False))[task]


def _requests(task, shots: int) -> list[tuple]:
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=42)
    task.build_all_requests(rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.request_type, inst.args) for inst in task.instances]


def test_logiqa_override_builds_lm_evals_requests(tmp_path):
    rows = _logiqa_rows()
    registry = write_registry_tasks(tmp_path / "registry", {"logiqa": rows}, ["logiqa"])
    override = write_paper_tasks(tmp_path / "override", {"logiqa": rows}, ["logiqa"])
    # The override reads the source text as its files write it, not our tidy rows
    for split, split_rows in rows.items():
        (override / f"logiqa.{split}.txt").write_text(_raw_logiqa_text(split_rows))
    theirs, ours = _load(registry, "logiqa"), _load(override, "logiqa")
    assert Path(ours.config.process_docs.__code__.co_filename).parent == task_data.OVERRIDES_DIR

    for split in ("training_docs", "validation_docs", "test_docs"):
        a, b = list(getattr(theirs, split)()), list(getattr(ours, split)())
        assert [dict(d) for d in b] == [dict(d) for d in a], split
    assert [ours.doc_to_text(d) for d in ours.test_docs()][1].startswith(
        "Passage: Passage 1. Second sentence 1.\nQuestion: Which option 1 follows?\nChoices:\n"
        "A. First 1\nB. Second 1. More\nC. Third 3. 5 kg\nD. Fourth\nAnswer:")
    for d_theirs, d_ours in zip(theirs.test_docs(), ours.test_docs(), strict=True):
        assert ours.doc_to_text(d_ours) == theirs.doc_to_text(d_theirs)
        assert ours.doc_to_choice(d_ours) == theirs.doc_to_choice(d_theirs)
        assert ours.doc_to_target(d_ours) == theirs.doc_to_target(d_theirs)
    assert [ours.doc_to_target(d) for d in ours.test_docs()] == [0, 1, 2, 3]
    for shots in (0, 1):  # the paper's 0-shot, and a demonstration from the train split
        assert _requests(ours, shots) == _requests(theirs, shots), f"{shots}-shot"
    assert len(ours.instances) == 4 * 4  # 4 questions x 4 choices

    # Same metric keys and values for the same log-likelihoods; same splits and settings
    doc = next(iter(ours.test_docs()))
    fake = [(-1.0, False), (-3.0, False), (-0.5, True), (-2.0, False)]
    assert ours.process_results(doc, fake) == theirs.process_results(doc, fake)
    assert ours.aggregation().keys() == theirs.aggregation().keys() == {"acc", "acc_norm"}
    assert ours.higher_is_better() == theirs.higher_is_better()
    for field in ("output_type", "training_split", "validation_split", "test_split",
                  "fewshot_split", "target_delimiter", "fewshot_delimiter", "metric_list",
                  "should_decontaminate"):
        assert getattr(ours.config, field) == getattr(theirs.config, field), field
    assert ours.config.metadata["version"] == theirs.config.metadata["version"] == 1.0


def test_logiqa_override_as_shipped_reads_the_pinned_source_files():
    cfg = yaml.safe_load((task_data.OVERRIDES_DIR / "logiqa.yaml").read_text()
                         .replace("!function", ""))
    assert cfg["task"] == "logiqa" and cfg["dataset_path"] == "text"
    kwargs = cfg["dataset_kwargs"]
    assert kwargs["sample_by"] == "document"  # whole files: blocks span lines
    base = f"https://raw.githubusercontent.com/lgw863/LogiQA-dataset/{LOGIQA_COMMIT}/"
    assert kwargs["data_files"] == {"train": base + "Train.txt",
                                    "validation": base + "Eval.txt", "test": base + "Test.txt"}
    assert "trust_remote_code" not in str(cfg)


def test_logiqa_rows_round_trip_through_the_source_text_writer():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "logiqa_source", task_data.OVERRIDES_DIR / "logiqa_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"label": "b", "context": "One. Two 3. 5.", "question": "Q?", "options": list("wxyz")}]
    assert "One.Two 3.5." in logiqa_source_text(rows)
    assert module.parse_text(logiqa_source_text(rows)) == rows
    with pytest.raises(ValueError, match="normalises to it"):
        logiqa_source_text([{**rows[0], "context": "glued.Sentence"}])


def test_overrides_come_before_the_config_folder_and_after_the_registry(tmp_path):
    assert task_data.overridden_tasks() == {t for t, _ in task_data.NEEDS_SCRIPT.values()}
    mine = tmp_path / "mine"
    mine.mkdir()
    paths = task_data.include_paths(["logiqa", "boolq"], str(mine))
    assert paths == [str(task_data.OVERRIDES_DIR), str(mine)]
    manager = build_task_manager(["logiqa", "boolq"], None)
    assert Path(manager.task_index["logiqa"].yaml_path).parent == task_data.OVERRIDES_DIR
    assert "lm_eval" in str(manager.task_index["boolq"].yaml_path)
    # a config's own folder still replaces an override
    write_registry_tasks(mine, tasks=["logiqa"])
    manager = build_task_manager(["logiqa", "boolq"], str(mine))
    assert Path(manager.task_index["logiqa"].yaml_path).parent == mine


def test_override_content_enters_the_eval_cache_key_only_where_used():
    assert task_data.overrides_fingerprint(["boolq", "lethe_synth_mc"]) is None
    key = task_data.overrides_fingerprint(["logiqa"])
    assert key is not None and len(key) == 64


def _paper_config_tasks() -> set[str]:
    tasks = set(yaml.safe_load((REPO / "configs/eval/paper_tasks.yaml").read_text())["tasks"])
    for path in sorted((REPO / "configs/paper").glob("*.yaml")):
        if not path.name.startswith("smoke"):  # smoke-1gpu: the synthetic corpus's tasks
            tasks |= set(load_config(path).evaluate.tasks)
    return tasks


def test_every_dataset_the_paper_tasks_read_loads_without_a_script():
    """The guard: resolved as the evaluation resolves them, every task of the shipped paper
    configs reads a dataset recorded as script-free, or a packaged builder (an override)."""
    tasks = sorted(_paper_config_tasks())
    assert set(tasks) == set(PAPER_TASKS)  # the 13; a new one needs local rows there too
    resolved = task_data.resolve_task_data(tasks)
    assert sorted(r.task for r in resolved) == tasks
    problems = [f"{r.task}: {r.status()[1]}" for r in resolved if not r.status()[0]]
    assert not problems, "\n".join(problems)
    by_task = {r.task: r for r in resolved}
    assert by_task["logiqa"].overridden and by_task["logiqa"].dataset_path == "text"
    assert not any(r.overridden for r in resolved if r.task != "logiqa")
    # The registry's own logiqa reads the script dataset the override replaces
    assert "EleutherAI/logiqa" in task_data.NEEDS_SCRIPT
    original = yaml.safe_load(registry_yaml("logiqa").read_text().replace("!function", ""))
    assert original["dataset_path"] == "EleutherAI/logiqa"


def test_guard_names_an_unrecorded_or_script_dataset():
    unknown = task_data.TaskData("newtask", "someone/new_dataset", None, {}, "/x/newtask.yaml")
    ok, why = unknown.status()
    assert not ok and "someone/new_dataset is not recorded" in why and "#3171" in why
    script = task_data.TaskData("logiqa", "EleutherAI/logiqa", "logiqa", {}, "/x/logiqa.yaml")
    ok, why = script.status()
    assert not ok and "needs a loading script" in why and "logiqa.yaml" in why
