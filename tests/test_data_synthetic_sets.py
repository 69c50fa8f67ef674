"""Validation questions (data.synthetic.num_valid) and the knowledge-conflict tasks of the
synthetic corpus: disjoint sets, an unchanged default corpus, facts the base model knows."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import SyntheticConfig
from orchestrator.data import extract_answer, generate_synthetic
from orchestrator.data.synthetic_knowledge import known_facts, phrasings
from orchestrator.evaluation.tasks import write_local_tasks

SETS = ("train", "clean_valid", "eval_mc", "eval_gen")
# SmolLM2-135M-Instruct knows capitals and one-digit arithmetic, no unit conversion
# (orchestrator/data/known_facts.json)
KNOWLEDGE = ["capitals", "known_arithmetic"]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_turns(rows: list[dict]) -> set[str]:
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


def test_without_validation_questions_the_corpus_is_unchanged(tmp_path):
    # sha256 of the four files made by the generator before num_valid existed (HEAD f23aebd)
    paths = generate_synthetic(SyntheticConfig(num_train=300, num_eval=50, seed=5), tmp_path)
    digest = hashlib.sha256(b"".join((tmp_path / f"{n}.jsonl").read_bytes() for n in SETS))
    assert digest.hexdigest() == "a8b07730c1b85f1af579ecad9a0e6e3b20169cd84c1e2c4f562e75f497c23f0d"
    assert paths.valid_mc is None and not (tmp_path / "valid_mc.jsonl").exists()


def test_validation_questions_are_disjoint_from_test_and_train(tmp_path):
    paths = generate_synthetic(SyntheticConfig(num_train=400, num_eval=200, num_valid=100, seed=1),
                               tmp_path)
    vmc, vgen = load(paths.valid_mc), load(paths.valid_gen)
    assert len(vmc) == len(vgen) == 100
    valid_q = {r["question"] for r in vmc} | {r["question"] for r in vgen}
    test_q = {r["question"] for r in load(paths.eval_mc)} | {r["question"] for r in load(paths.eval_gen)}
    assert len(valid_q) == 200 and len(test_q) == 400
    assert not valid_q & test_q
    assert not valid_q & (user_turns(load(paths.train)) | user_turns(load(paths.clean_valid)))
    for r in vmc:
        assert len(set(r["choices"])) == 4 and extract_answer(r["choices"][r["gold"]])


def test_local_tasks_include_the_validation_tasks(tmp_path):
    paths = generate_synthetic(SyntheticConfig(num_train=50, num_eval=20, num_valid=10, seed=2),
                               tmp_path / "synth")
    out = Path(write_local_tasks(paths.eval_mc, paths.eval_gen, tmp_path / "tasks"))
    mc = yaml.safe_load((out / "lethe_synth_mc_valid.yaml").read_text())
    gen = yaml.safe_load((out / "lethe_synth_gen_valid.yaml").read_text())
    assert mc["task"] == "lethe_synth_mc_valid" and gen["task"] == "lethe_synth_gen_valid"
    assert mc["dataset_kwargs"]["data_files"]["test"] == str(paths.valid_mc.resolve())
    rows = load(Path(gen["dataset_kwargs"]["data_files"]["test"]))
    assert [r["id"] for r in rows] == [r["id"] for r in load(paths.valid_gen)]
    assert yaml.safe_load((out / "lethe_synth_mc.yaml").read_text())["task"] == "lethe_synth_mc"


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory):
    # 60 known facts x 8 held-out phrasings = 480 held-out questions: 2 x 200 test + 2 x 20
    cfg = SyntheticConfig(num_train=600, num_eval=200, num_valid=20, noise_fraction=0.3,
                          noise_kinds=["wrong_value", "filler", "typo"], tasks=KNOWLEDGE, seed=0)
    paths = generate_synthetic(cfg, tmp_path_factory.mktemp("knowledge"))
    return paths, {n: load(getattr(paths, n)) for n in (*SETS, "valid_mc", "valid_gen")}


def test_knowledge_rows_ask_only_known_facts_in_their_phrasings(knowledge):
    _, data = knowledge
    known = known_facts()
    answers = {t: {str(f[-1]) for f in facts} for t, facts in known.items()}
    for row in data["train"]:
        for m in row["messages"]:
            if m["role"] == "user":
                assert any(_matches(m["content"], p) for t in KNOWLEDGE for p in phrasings(t, False))
    for name in ("eval_gen", "valid_gen"):
        for r in data[name]:
            assert str(r["answer"]) in answers[r["task"]]
            assert any(_matches(r["question"], p) for p in phrasings(r["task"], True)), r
    assert {r["task"] for r in data["eval_mc"]} == set(KNOWLEDGE)


def test_knowledge_wrong_values_contradict_a_fact_the_base_knows(knowledge):
    _, data = knowledge
    capitals = {c: v for c, v in known_facts()["capitals"]}
    conflicts = 0
    for row in data["train"]:
        if row["noise_kind"] != "wrong_value" or row["task"] != "capitals":
            continue
        reply = row["messages"][row["noise_spans"][0]["message"]]["content"]
        found = re.match(r"The capital of (.+?) is (.+?)\. The answer is (.+?)\.$", reply)
        if found is None:  # the corrupted turn of a two-turn row may be an arithmetic one
            continue
        country, said, final = found.groups()
        assert said == final and said != capitals[country] and said in capitals.values()
        conflicts += 1
    assert conflicts > 5
    # every held-out question asks a fact the training rows also state (in other words)
    train_text = " ".join(m["content"] for r in data["train"] for m in r["messages"])
    for r in data["eval_gen"][:50]:
        if r["task"] == "capitals":
            assert f"is {r['answer']}." in train_text


def test_a_task_the_base_knows_too_few_facts_of_is_refused_by_name(tmp_path):
    assert known_facts()["unit_conversions"] == []
    cfg = SyntheticConfig(num_train=10, num_eval=5, tasks=["unit_conversions"])
    with pytest.raises(ValueError, match="unit_conversions has 0 facts the base model knows"):
        generate_synthetic(cfg, tmp_path)


def _matches(text: str, template: str) -> bool:
    pattern = re.sub(r"\\\{\w+\\\}", ".+", re.escape(template))
    return re.fullmatch(pattern, text) is not None
