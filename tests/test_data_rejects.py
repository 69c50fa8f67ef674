"""Rejected rows: one per reason, with its row number; the fraction threshold; bad sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.config import DataConfig
from orchestrator.data import DataError, prepare_dataset, read_tokens

sys.path.insert(0, str(Path(__file__).parent / "data"))
from lethe_tiny_tokenizers import build_tokenizer  # noqa: E402

GOOD = {"prompt": "What is 37 + 58?", "completion": "The answer is 95."}
LONG_PROMPT = " ".join(["Hello there, how are you today?"] * 20)

# (line written to the JSONL file, expected reason or None when accepted)
CASES = [
    (GOOD, None),
    ("{not json", "invalid_json"),
    ({"question": "no known fields"}, "missing_fields"),
    ({"messages": []}, "empty_messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "unknown_role"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "non_string_content"),
    ({"prompt": "hi", "completion": "   "}, "empty_assistant_content"),
    ({"prompt": LONG_PROMPT, "completion": "The answer is 95."}, "no_response_tokens_after_truncation"),
    ([1, 2, 3], "not_an_object"),
    ({**GOOD, "noise_spans": [{"message": 0, "start": 0, "end": 2}]}, "invalid_noise_spans"),
    ({**GOOD, "noise_spans": [{"message": 1, "start": 4, "end": 99}]}, "invalid_noise_spans"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing_fields"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "empty_assistant_content"),
    ({**GOOD, "noise_spans": [{"message": 1, "start": 4, "end": 10}]}, None),
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_cases(path: Path) -> Path:
    lines = [c if isinstance(c, str) else json.dumps(c) for c, _ in CASES]
    # a blank line is not a row: numbering continues after it
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    return path


def test_each_reason_is_recorded_with_its_row(tmp_path, tok):
    src = write_cases(tmp_path / "rows.jsonl")
    cfg = DataConfig(source="file", path=str(src), max_seq_len=64, max_rejected_fraction=1.0)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    rejects = [json.loads(line) for line in report.rejects_path.read_text().splitlines()]
    expected = [(i, reason) for i, (_, reason) in enumerate(CASES) if reason]
    assert [(r["row"], r["reason"]) for r in rejects] == expected
    assert all(r["detail"] for r in rejects)
    assert "line 2" in rejects[0]["detail"]  # invalid JSON names its line
    assert "'bot'" in next(r["detail"] for r in rejects if r["reason"] == "unknown_role")

    accepted = [i for i, (_, reason) in enumerate(CASES) if reason is None]
    table = read_tokens(report.tokens_path).to_pylist()
    assert [r["sample_id"] for r in table] == accepted
    # noise spans present on one row: the column exists, zeros on the unannotated row
    assert sum(table[0]["noise_mask"]) == 0
    noisy = table[1]
    noise_ids = [t for t, m in zip(noisy["input_ids"], noisy["noise_mask"], strict=True) if m]
    assert tok.decode(noise_ids).strip() == "answer"  # content[4:10]

    body = json.loads(report.report_path.read_text())
    assert body["rows"] == len(CASES) and body["accepted"] == len(accepted)
    assert body["rejects_by_reason"] == {
        "empty_assistant_content": 2, "empty_messages": 1, "invalid_json": 1,
        "invalid_noise_spans": 2, "missing_fields": 2, "no_assistant_turn": 1,
        "no_response_tokens_after_truncation": 1, "non_string_content": 1, "not_an_object": 1,
        "unknown_role": 1,
    }
    assert report.rejects_by_reason == body["rejects_by_reason"]


def test_rejected_fraction_above_threshold_raises_with_counts(tmp_path, tok):
    src = write_cases(tmp_path / "rows.jsonl")
    cfg = DataConfig(source="file", path=str(src), max_seq_len=64, max_rejected_fraction=0.5)
    with pytest.raises(DataError) as err:
        prepare_dataset(cfg, tok, tmp_path / "out")
    msg = str(err.value)
    assert f"rejected 13 of {len(CASES)} rows" in msg
    assert "invalid_json=1" in msg and "missing_fields=2" in msg
    assert str(tmp_path / "out" / "rejects.jsonl") in msg
    assert not (tmp_path / "out" / "tokens.parquet").exists()
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 13


def test_format_forced_to_messages_rejects_prompt_completion(tmp_path, tok):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps(GOOD) + "\n")
    cfg = DataConfig(source="file", path=str(src), format="messages", max_rejected_fraction=1.0)
    with pytest.raises(DataError, match="all 1 rows were rejected: missing_fields=1"):
        prepare_dataset(cfg, tok, tmp_path / "out")


def test_bad_sources_are_clear_errors(tmp_path, tok):
    bad_json = tmp_path / "rows.json"
    bad_json.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="list of rows"):
        prepare_dataset(DataConfig(source="file", path=str(bad_json)), tok, tmp_path / "o1")
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(DataConfig(source="file", path=str(tmp_path / "x.jsonl")), tok, tmp_path / "o2")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "rows.csv").write_text("a,b\n")
        prepare_dataset(DataConfig(source="file", path=str(tmp_path / "rows.csv")), tok, tmp_path / "o3")
    with pytest.raises(DataError, match="rows_path"):
        prepare_dataset(DataConfig(source="synthetic"), tok, tmp_path / "o4")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        prepare_dataset(DataConfig(source="file", path=str(empty)), tok, tmp_path / "o5")
