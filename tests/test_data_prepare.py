"""prepare_dataset: exact response masks (paper and tokenizer templates), truncation,
the straddling-token rule, format_prompt, and the loader-independence of the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from orchestrator.config import DataConfig
from orchestrator.data import DataError, corpus_texts, format_prompt, prepare_dataset, read_tokens
from orchestrator.data.token_masks import spans_to_token_mask

sys.path.insert(0, str(Path(__file__).parent / "data"))
from lethe_tiny_tokenizers import EOS, build_tokenizer  # noqa: E402

PC_ROW = {"prompt": "What is 37 + 58?", "completion": "37 + 58 = 95. The answer is 95."}
SYSTEM_ROW = {
    "id": "sys-1",
    "messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Sort the list [3, 1, 2]."},
        {"role": "assistant", "content": "The answer is [1, 2, 3]."},
    ],
}
MULTI_ROW = {
    "messages": [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is 37 + 58?"},
        {"role": "assistant", "content": "The answer is 95."},
    ],
}
# transformers renders with trim_blocks, so newlines after block tags are written as {{ '\n' }}
SIMPLE_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@pytest.fixture(scope="module", params=[True, False], ids=["tags_special", "tags_plain_text"])
def tokenizer(request):
    return build_tokenizer(tags_special=request.param)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def runs(ids, mask) -> list[list[int]]:
    """Contiguous runs of ids where mask == 1."""
    out, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def prepare_rows(tmp_path, tok, rows, **cfg_kw):
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig(source="file", path=str(src), **cfg_kw)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    return report, read_tokens(report.tokens_path).to_pylist()


def test_prompt_completion_mask_is_completion_plus_eos(tmp_path, tokenizer):
    _, [row] = prepare_rows(tmp_path, tokenizer, [PC_ROW])
    ids, mask = row["input_ids"], row["response_mask"]
    text = "<|user|>\nWhat is 37 + 58?\n<|assistant|>\n37 + 58 = 95. The answer is 95.<|endoftext|>\n"
    assert tokenizer.decode(ids) == text
    assert [tokenizer.decode(r) for r in runs(ids, mask)] == [PC_ROW["completion"] + EOS]
    # the prompt side, tag and newline included, is exactly what format_prompt builds
    prompt_len = mask.index(1)
    assert tokenizer.decode(ids[:prompt_len]) == format_prompt([{"role": "user", "content": PC_ROW["prompt"]}])
    assert mask[-1] == 0 and tokenizer.decode(ids[-1:]) == "\n"
    assert row["num_tokens"] == len(ids) and "noise_mask" not in row


def test_system_turn_is_not_trained(tmp_path, tokenizer):
    _, [row] = prepare_rows(tmp_path, tokenizer, [SYSTEM_ROW])
    got = [tokenizer.decode(r) for r in runs(row["input_ids"], row["response_mask"])]
    assert got == ["The answer is [1, 2, 3]." + EOS]
    assert tokenizer.decode(row["input_ids"]).startswith("<|system|>\nYou are a careful assistant.\n<|user|>\n")
    assert row["source_id"] == "sys-1"


def test_multi_turn_masks_both_assistant_turns_only(tmp_path, tokenizer):
    _, [row] = prepare_rows(tmp_path, tokenizer, [MULTI_ROW])
    got = [tokenizer.decode(r) for r in runs(row["input_ids"], row["response_mask"])]
    assert got == ["I am fine, thank you." + EOS, "The answer is 95." + EOS]
    unmasked = [t for t, m in zip(row["input_ids"], row["response_mask"], strict=True) if not m]
    assert "Hello there!" in tokenizer.decode(unmasked) and "thank" not in tokenizer.decode(unmasked)
    # the generation prompt for the second turn (history ends with eos) is the exact prefix
    second_start = [i for i, m in enumerate(row["response_mask"]) if m][len(runs(row["input_ids"], row["response_mask"])[0])]
    prompt = format_prompt(MULTI_ROW["messages"][:3], eos_token=EOS)
    assert tokenizer.decode(row["input_ids"][:second_start]) == prompt
    assert prompt == format_prompt(MULTI_ROW["messages"][:3], tokenizer=tokenizer)
    assert prompt.endswith("thank you.<|endoftext|>\n<|user|>\nWhat is 37 + 58?\n<|assistant|>\n")


def test_truncation_keeps_start_and_cuts_response(tmp_path, tokenizer):
    _, [full] = prepare_rows(tmp_path, tokenizer, [PC_ROW])
    start = full["response_mask"].index(1)
    limit = start + 3  # three response tokens survive
    assert limit >= 8  # DataConfig's minimum max_seq_len
    report, [row] = prepare_rows(tmp_path, tokenizer, [PC_ROW], max_seq_len=limit)
    assert row["input_ids"] == full["input_ids"][:limit]
    assert row["response_mask"] == full["response_mask"][:limit]
    kept = tokenizer.decode([t for t, m in zip(row["input_ids"], row["response_mask"], strict=True) if m])
    assert PC_ROW["completion"].startswith(kept) and 0 < len(kept) < len(PC_ROW["completion"])
    assert json.loads(report.report_path.read_text())["truncated"] == 1


def test_tokenizer_chat_template_path(tmp_path, tokenizer):
    tokenizer.chat_template = SIMPLE_TEMPLATE
    try:
        _, [row] = prepare_rows(tmp_path, tokenizer, [MULTI_ROW], chat_template="tokenizer")
        ids = row["input_ids"]
        assert tokenizer.decode(ids).startswith("### user:\nHello there!\n### assistant:\nI am fine")
        got = [tokenizer.decode(r) for r in runs(ids, row["response_mask"])]
        assert got == ["I am fine, thank you." + EOS, "The answer is 95." + EOS]
        prompt = format_prompt(MULTI_ROW["messages"][:3], template="tokenizer", tokenizer=tokenizer)
        assert prompt.endswith("### user:\nWhat is 37 + 58?\n### assistant:\n")
        second = [i for i, m in enumerate(row["response_mask"]) if m][len(runs(ids, row["response_mask"])[0])]
        assert tokenizer.decode(ids[:second]) == prompt
    finally:
        tokenizer.chat_template = None


def test_tokenizer_template_without_chat_template_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="has no chat_template"):
        prepare_rows(tmp_path, tokenizer, [PC_ROW], chat_template="tokenizer")


def test_straddling_rule_on_offsets():
    # tokens: [0,4) prompt | [4,9) straddles into the span | [9,12) inside | [12,14) straddles out
    # | (0,0) added special token | [14,16) outside
    offsets = np.array([[0, 4], [4, 9], [9, 12], [12, 14], [0, 0], [14, 16]])
    assert spans_to_token_mask(offsets, [(7, 13)]).tolist() == [0, 1, 1, 1, 0, 0]
    assert spans_to_token_mask(offsets, [(4, 9), (14, 15)]).tolist() == [0, 1, 0, 0, 0, 1]
    assert spans_to_token_mask(offsets, []).tolist() == [0] * 6


def test_straddling_token_with_a_real_tokenizer(tmp_path):
    # Whitespace-split words: "assistant:yes" is one token that starts in the role header
    # and ends in the content; under the overlap rule it is trained.
    vocab = {"[UNK]": 0, "user:hi": 1, "assistant:yes": 2, "there": 3, "</s>": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes there"}]}]
    _, [row] = prepare_rows(tmp_path, tok, rows, chat_template="tokenizer")
    assert row["input_ids"] == [1, 2, 3, 4]
    assert row["response_mask"] == [0, 1, 1, 1]


def test_loaders_give_identical_tokens(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = build_tokenizer()
    rows = [PC_ROW, SYSTEM_ROW, MULTI_ROW]
    # one schema for every row so Parquet / datasets hold the same rows
    uniform = [{"id": r.get("id"), "messages": r.get("messages"), "prompt": r.get("prompt"),
                "completion": r.get("completion")} for r in rows]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(uniform), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(uniform).save_to_disk(str(tmp_path / "hf_dir"))
    tables = {}
    for name, source in [("rows.jsonl", "file"), ("rows.json", "file"), ("wrapped.json", "file"),
                         ("rows.parquet", "file"), ("hf_dir", "hf")]:
        cfg = DataConfig(source=source, path=str(tmp_path / name))
        report = prepare_dataset(cfg, tok, tmp_path / f"out_{name}")
        assert (report.num_rows, report.num_accepted) == (3, 3)
        tables[name] = read_tokens(report.tokens_path).select(
            ["sample_id", "input_ids", "response_mask", "num_tokens", "source_id"]).to_pylist()
    # a saved DatasetDict: the configured split is picked, a missing one is named
    datasets.DatasetDict({"train": datasets.Dataset.from_list(uniform)}).save_to_disk(str(tmp_path / "hf_dict"))
    report = prepare_dataset(DataConfig(source="hf", path=str(tmp_path / "hf_dict")), tok, tmp_path / "out_dict")
    tables["hf_dict"] = read_tokens(report.tokens_path).select(
        ["sample_id", "input_ids", "response_mask", "num_tokens", "source_id"]).to_pylist()
    with pytest.raises(DataError, match=r"split 'test' not found; available: \['train'\]"):
        prepare_dataset(DataConfig(source="hf", path=str(tmp_path / "hf_dict"), split="test"), tok,
                        tmp_path / "out_missing")
    first = tables["rows.jsonl"]
    assert [r["sample_id"] for r in first] == [0, 1, 2]
    assert [r["source_id"] for r in first] == [None, "sys-1", None]
    for name, table in tables.items():
        assert table == first, name


def test_limit_caps_rows_and_corpus_texts(tmp_path):
    tok = build_tokenizer()
    report, table = prepare_rows(tmp_path, tok, [PC_ROW, SYSTEM_ROW, MULTI_ROW], limit=2)
    # data.limit is a seeded random sample that keeps source row numbers (tests/test_sampling.py)
    from orchestrator.data.sampling import plan_split

    expected = plan_split(3, limit=2, seed=0).train.tolist()
    assert report.num_rows == 2 and [r["sample_id"] for r in table] == expected
    texts = list(corpus_texts(tmp_path / "rows.jsonl"))
    assert texts[0] == "What is 37 + 58?\n37 + 58 = 95. The answer is 95."
    assert len(texts) == 3 and texts[2].startswith("Hello there!\nI am fine")
    report_json = json.loads(report.report_path.read_text())
    assert report_json["tokens"]["total"] == sum(r["num_tokens"] for r in table)
    assert report_json["tokens"]["response"] == sum(sum(r["response_mask"]) for r in table)
    assert report_json["length_percentiles"]["max"] == max(r["num_tokens"] for r in table)


def test_tokenizer_corpus_reads_the_configured_split_of_a_hub_dataset(monkeypatch):
    """The base stage trains a from-config model's tokenizer on data.split, the split that is
    tokenized, not always "train"."""
    from orchestrator.data import loading

    asked = []

    def fake_iter_hf(path, split, revision=None):
        asked.append(split)
        return iter([{"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "there"}]}])

    monkeypatch.setattr(loading, "_iter_hf", fake_iter_hf)
    assert list(corpus_texts("org/data", "validation")) == ["hi\nthere"]
    assert asked == ["validation"]
