"""Synthetic corpus: determinism, noise fraction and spans, checkable answers, disjoint
eval splits, and noise spans carried exactly into noise_mask by prepare_dataset."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from orchestrator.config import DataConfig, SyntheticConfig
from orchestrator.data import (
    corpus_texts,
    extract_answer,
    generate_synthetic,
    prepare_dataset,
    read_tokens,
)
from orchestrator.data.synthetic import FILLER_WORDS
from orchestrator.data.synthetic_tasks import world

sys.path.insert(0, str(Path(__file__).parent / "data"))
from lethe_tiny_tokenizers import build_tokenizer  # noqa: E402

FILES = ("train", "clean_valid", "eval_mc", "eval_gen")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = SyntheticConfig(num_train=2000, num_eval=200, noise_fraction=0.3, seed=7)
    out = tmp_path_factory.mktemp("synth")
    paths = generate_synthetic(cfg, out)
    return cfg, paths, {name: load(getattr(paths, name)) for name in FILES}


def test_sizes_and_determinism(corpus, tmp_path):
    """(Its speed is benchmarks/synthetic_bench.py's claim: no wall-clock limit in a test.)"""
    cfg, paths, data = corpus
    assert [len(data[n]) for n in FILES] == [2000, 200, 200, 200]
    again = generate_synthetic(cfg, tmp_path / "again")
    other = generate_synthetic(cfg.model_copy(update={"seed": 8}), tmp_path / "other")
    for name in FILES:
        assert getattr(again, name).read_bytes() == getattr(paths, name).read_bytes(), name
        assert getattr(other, name).read_bytes() != getattr(paths, name).read_bytes(), name


def test_noise_fraction_kinds_and_spans(corpus):
    cfg, paths, data = corpus
    train = data["train"]
    noisy = [r for r in train if r["noisy"]]
    assert len(noisy) == paths.num_noisy == round(0.3 * 2000)
    assert {r["noise_kind"] for r in noisy} == {"wrong_value", "filler", "typo"}
    assert all(r["noise_spans"] == [] and r["noise_kind"] is None for r in train if not r["noisy"])
    for r in noisy:
        assert r["noise_spans"], r["id"]
        for span in r["noise_spans"]:
            content = r["messages"][span["message"]]["content"]
            assert r["messages"][span["message"]]["role"] == "assistant"
            text = content[span["start"]:span["end"]]
            if r["noise_kind"] == "filler":
                words = [w.strip() for w in text.strip().rstrip(",").split(",")]
                assert text.startswith(" ") and set(words) <= set(FILLER_WORDS), text
            elif r["noise_kind"] == "typo":
                assert re.fullmatch(r"[A-Za-z]{4,}", text), text
            else:  # wrong_value: the (wrong) final answer is the span text
                assert extract_answer(content) == text
        if r["noise_kind"] == "wrong_value":
            assert len(r["noise_spans"]) == 2  # explanation + final answer both replaced


def test_multi_turn_and_system_rows_exist(corpus):
    train = corpus[2]["train"]
    n_multi = sum(r["task"] == "multi_turn" for r in train)
    n_system = sum(r["messages"][0]["role"] == "system" for r in train)
    assert 250 < n_multi < 550 and 250 < n_system < 550
    assert all(len(r["tasks"]) == 2 for r in train if r["task"] == "multi_turn")


def _check_answer(question: str, answer: str) -> bool | None:
    """Recompute the answer from the question text; None when the task is world knowledge."""
    if m := re.fullmatch(r"(?:What is|Compute|Calculate) (\d+) ([-+*]) (\d+)[?.]", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
    if m := re.search(r"\[([\d, ]+)\]", question):
        xs = [int(x) for x in m[1].split(", ")]
        if question.startswith("Sort"):
            return answer == str(sorted(xs))
        if question.startswith("Reverse the list"):
            return answer == str(xs[::-1])
        return int(answer) == (max(xs) if "largest" in question else min(xs))
    if quoted := re.findall(r"'([a-z]+)'", question):
        word = quoted[-1]  # the made-up word is the last quoted token (a letter may precede it)
        if question.startswith("Reverse"):
            return answer == word[::-1]
        if "uppercase" in question:
            return answer == word.upper()
        if letter := re.match(r"How many times does the letter '(\w)'", question):
            return int(answer) == word.count(letter[1])
        return int(answer) == len(word)
    return None


def test_answers_are_checkable_and_facts_consistent(corpus):
    data = corpus[2]
    facts: dict[str, str] = {}
    checked = 0
    for r in data["train"] + data["clean_valid"]:
        if r["noisy"]:
            continue
        msgs = r["messages"]
        for q, a in zip(msgs, msgs[1:], strict=False):
            if q["role"] != "user":
                continue
            answer = extract_answer(a["content"])
            ok = _check_answer(q["content"], answer)
            if ok is None:  # world facts: one question always gets one answer
                assert facts.setdefault(q["content"], answer) == answer
            else:
                assert ok, (q["content"], a["content"])
                checked += 1
    assert checked > 1000
    names = {realm["name"] for realm in world()}
    assert len(names) == len(world()) == 50


def test_eval_splits_disjoint_and_mc_well_formed(corpus):
    data = corpus[2]
    train_q = {m["content"] for r in data["train"] for m in r["messages"] if m["role"] == "user"}
    valid_q = {m["content"] for r in data["clean_valid"] for m in r["messages"] if m["role"] == "user"}
    mc_q = {r["question"] for r in data["eval_mc"]}
    gen_q = {r["question"] for r in data["eval_gen"]}
    assert len(mc_q) == len(gen_q) == 200
    assert not (train_q & mc_q) and not (train_q & gen_q) and not (train_q & valid_q)
    assert not (mc_q & gen_q) and not (valid_q & (mc_q | gen_q))
    assert {r["task"] for r in data["eval_mc"]} == {"arithmetic", "world_facts", "list_ops", "string_ops"}
    for r in data["eval_mc"]:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert 0 <= r["gold"] < 4
        finals = [extract_answer(c) for c in r["choices"]]
        assert len(set(finals)) == 4
        if (ok := _check_answer(r["question"], finals[r["gold"]])) is not None:
            assert ok and not any(_check_answer(r["question"], f) for i, f in enumerate(finals) if i != r["gold"])
    for r in data["eval_gen"]:
        assert r["answer"] and _check_answer(r["question"], r["answer"]) in (True, None)
    golds = [r["gold"] for r in data["eval_mc"]]
    assert len(set(golds)) == 4  # the gold position is shuffled


def test_noise_mask_is_exactly_the_corrupted_tokens(tmp_path):
    paths = generate_synthetic(SyntheticConfig(num_train=300, num_eval=20, noise_fraction=0.5, seed=3),
                               tmp_path / "synth")
    tok = build_tokenizer(texts=list(corpus_texts(paths.train)), vocab_size=600)
    report = prepare_dataset(DataConfig(source="synthetic"), tok, tmp_path / "tokens", rows_path=str(paths.train))
    assert report.num_accepted == 300 and report.has_noise_mask
    rows = {r["sample_id"]: r for r in read_tokens(report.tokens_path).to_pylist()}
    source = load(paths.train)
    for i, src in enumerate(source):
        row = rows[i]
        assert row["source_id"] == src["id"]
        assert all(r >= n for r, n in zip(row["response_mask"], row["noise_mask"], strict=True))
        noise_runs, cur = [], []
        for t, m in zip(row["input_ids"], row["noise_mask"], strict=True):
            if m:
                cur.append(t)
            elif cur:
                noise_runs.append(cur)
                cur = []
        expected = [src["messages"][s["message"]]["content"][s["start"]:s["end"]] for s in src["noise_spans"]]
        decoded = [tok.decode(run) for run in noise_runs]
        assert len(decoded) == len(expected), src["id"]
        for run_text, span_text in zip(decoded, expected, strict=True):
            # the run is the span plus, at most, space/punctuation its edge tokens share with
            # clean text (ByteLevel keeps " 95" or "]." together); never a clean letter/digit
            at = run_text.find(span_text)
            assert at >= 0, (src["id"], run_text, span_text)
            outside = run_text[:at] + run_text[at + len(span_text):]
            assert not re.search(r"[A-Za-z0-9]", outside), (src["id"], run_text, span_text)
    noisy_tokens = sum(sum(r["noise_mask"]) for r in rows.values())
    assert noisy_tokens == report.num_noise_tokens > 0
