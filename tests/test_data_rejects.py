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


# ----------------------------------------------------------------------------- inputs that
# used to crash the run: each is now a counted reject (or a one-line DataError), and the good
# rows of the same file are all accepted.

LLAMA2_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _good(i: int) -> bytes:
    return json.dumps({"prompt": f"What is {i} + 1?", "completion": f"The answer is {i + 1}."}).encode()


def _rejects(report) -> list[tuple[int, str]]:
    return [(r["row"], r["reason"]) for r in map(json.loads, report.rejects_path.read_text().splitlines())]


def test_unreadable_jsonl_lines_are_rejects_and_good_rows_stay(tmp_path, tok):
    nested = b"[" * 5_000 + b"]" * 5_000  # deeper than json's recursion limit
    huge = json.dumps({"prompt": "x" * 30_000, "completion": "The answer is 1."}).encode()
    lines = [
        _good(0),
        b'{"prompt": "caf\xe9 au lait?", "completion": "The answer is 1."}',  # latin-1 byte
        _good(2),
        nested,
        _good(4),
        huge,
        _good(6),
    ]
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM is not a bad row
    cfg = DataConfig(source="file", path=str(src), max_seq_len=64, max_rejected_fraction=1.0,
                     max_row_chars=20_000)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    assert _rejects(report) == [(1, "invalid_utf8"), (3, "too_deeply_nested"), (5, "row_too_large")]
    details = [json.loads(x)["detail"] for x in report.rejects_path.read_text().splitlines()]
    assert "line 2" in details[0] and "0xe9" in details[0]
    assert "line 4" in details[1]
    assert "line 6" in details[2] and "max_row_chars=20000" in details[2]
    assert read_tokens(report.tokens_path)["sample_id"].to_pylist() == [0, 2, 4, 6]


def test_oversized_line_is_not_held_in_memory(tmp_path, tok):
    # 4x the limit in bytes is the most a line can be read before it is rejected unparsed.
    src = tmp_path / "rows.jsonl"
    src.write_bytes(_good(0) + b"\n" + b"{" * 50_000 + b"\n" + _good(2) + b"\n")
    cfg = DataConfig(source="file", path=str(src), max_seq_len=64, max_rejected_fraction=1.0,
                     max_row_chars=100)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    assert _rejects(report) == [(1, "row_too_large")]
    assert "50001 bytes" in report.rejects_path.read_text()
    assert read_tokens(report.tokens_path)["sample_id"].to_pylist() == [0, 2]


def test_chat_template_that_raises_rejects_the_row(tmp_path, tok):
    tok = build_tokenizer()
    tok.chat_template = LLAMA2_STYLE_TEMPLATE
    rows = [
        {"messages": [{"role": "user", "content": "What is 1 + 1?"},
                      {"role": "assistant", "content": "The answer is 2."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "The answer is 3."}]},
        {"prompt": "What is 2 + 2?", "completion": "The answer is 4."},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(source="file", path=str(src), chat_template="tokenizer", max_seq_len=64,
                     max_rejected_fraction=1.0)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    assert _rejects(report) == [(1, "chat_template_error")]
    assert "roles must alternate" in report.rejects_path.read_text()
    assert read_tokens(report.tokens_path)["sample_id"].to_pylist() == [0, 2]


def _parquet_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "completion": f"The answer is {i + 1}."} for i in range(n)]


def test_corrupt_parquet_footer_is_one_line_error(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(_parquet_rows(4)), path)
    path.write_bytes(path.read_bytes()[:-20])  # truncated: the footer is gone
    with pytest.raises(DataError) as err:
        prepare_dataset(DataConfig(source="file", path=str(path)), tok, tmp_path / "out")
    msg = str(err.value)
    assert str(path) in msg and "not a readable Parquet file" in msg and "\n" not in msg


def test_corrupt_parquet_row_group_rejects_its_rows_only(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(_parquet_rows(12)), path, row_group_size=4,
                   compression="snappy")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(0)  # the middle group's first column chunk
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start: start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
    cfg = DataConfig(source="file", path=str(path), max_seq_len=64, max_rejected_fraction=1.0)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    assert _rejects(report) == [(i, "unreadable_parquet") for i in range(4, 8)]
    assert "row group 1 (rows 4-7)" in report.rejects_path.read_text()
    assert read_tokens(report.tokens_path)["sample_id"].to_pylist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_row_size_limit_applies_to_parquet_rows_before_tokenizing(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _parquet_rows(3)
    rows[1]["prompt"] = "y" * 300
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = DataConfig(source="file", path=str(path), max_seq_len=64, max_rejected_fraction=1.0,
                     max_row_chars=200)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    assert _rejects(report) == [(1, "row_too_large")]
    assert read_tokens(report.tokens_path)["sample_id"].to_pylist() == [0, 2]


def test_bad_json_document_is_one_line_error(tmp_path, tok):
    bad = tmp_path / "rows.json"
    bad.write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(DataError, match=r"rows.json: byte 14 is not UTF-8"):
        prepare_dataset(DataConfig(source="file", path=str(bad)), tok, tmp_path / "o1")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested deeper"):
        prepare_dataset(DataConfig(source="file", path=str(deep)), tok, tmp_path / "o2")
