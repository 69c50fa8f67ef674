"""Row layouts (orchestrator/data/row_formats.py): messages, sharegpt, prompt_completion and
alpaca rows become the same messages; what is trained decodes to exactly the assistant
text + end marker under both chat templates; malformed rows are rejected naming the field;
`auto` reads a file mixing layouts; data.columns / data.roles rename columns and roles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, DataConfig, config_from_dict, load_config
from orchestrator.data import corpus_texts, prepare_dataset, read_tokens
from orchestrator.data.chat_format import conversation_from_row, render_paper
from orchestrator.data.errors import RowRejected
from orchestrator.data.row_formats import FORMATS, describe_first_rows, detect_format

sys.path.insert(0, str(Path(__file__).parent / "data"))
sys.path.insert(0, str(Path(__file__).parent))
from lethe_tiny_tokenizers import EOS, build_tokenizer  # noqa: E402
from test_data_prepare import runs  # noqa: E402  (contiguous trained-token runs)

REPO = Path(__file__).resolve().parent.parent
# "### role:" headers: a template unlike the paper's, with the eos as end-of-turn marker
OWN_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# (case id, row, layout auto must find, the messages it becomes, the trained assistant texts)
CASES = [
    ("messages_system_multiturn_unicode",
     {"messages": [_m("system", "Sé breve."), _m("user", "¿Cuánto es 2+2?"),
                   _m("assistant", "2+2 = 4 ✓"), _m("user", "¿Y 3+3?"), _m("assistant", "6")]},
     "messages",
     [_m("system", "Sé breve."), _m("user", "¿Cuánto es 2+2?"), _m("assistant", "2+2 = 4 ✓"),
      _m("user", "¿Y 3+3?"), _m("assistant", "6")],
     ["2+2 = 4 ✓", "6"]),
    ("sharegpt_system_column_multiturn_unicode",
     {"system": "Réponds en français.",
      "conversations": [{"from": "human", "value": "Bonjour, ça va ?"},
                        {"from": "gpt", "value": "Très bien, merci ! 😊"},
                        {"from": "human", "value": "Et 2+2 ?"},
                        {"from": "gpt", "value": "2+2 = 4."}]},
     "sharegpt",
     [_m("system", "Réponds en français."), _m("user", "Bonjour, ça va ?"),
      _m("assistant", "Très bien, merci ! 😊"), _m("user", "Et 2+2 ?"), _m("assistant", "2+2 = 4.")],
     ["Très bien, merci ! 😊", "2+2 = 4."]),
    ("sharegpt_system_turn_user_assistant_names",
     {"conversations": [{"from": "system", "value": "你是助手。"},
                        {"from": "user", "value": "一加一等于几？"},
                        {"from": "assistant", "value": "等于二。"}], "system": ""},
     "sharegpt",
     [_m("system", "你是助手。"), _m("user", "一加一等于几？"), _m("assistant", "等于二。")],
     ["等于二。"]),
    ("prompt_completion_strings",
     {"prompt": "What is 37 + 58?", "completion": "37 + 58 = 95."},
     "prompt_completion",
     [_m("user", "What is 37 + 58?"), _m("assistant", "37 + 58 = 95.")],
     ["37 + 58 = 95."]),
    ("prompt_completion_conversational_only_completion_trained",
     {"prompt": [_m("system", "Be terse."), _m("user", "Hi"), _m("assistant", "Hello."),
                 _m("user", "Capital of Velmora?")],
      "completion": [_m("assistant", "Drastel.")]},
     "prompt_completion",
     [_m("system", "Be terse."), _m("user", "Hi"), _m("assistant", "Hello."),
      _m("user", "Capital of Velmora?"), _m("assistant", "Drastel.")],
     ["Drastel."]),
    ("alpaca_input_and_system",
     {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen",
      "system": "You translate."},
     "alpaca",
     [_m("system", "You translate."), _m("user", "Translate to German.\n\nGood morning"),
      _m("assistant", "Guten Morgen")],
     ["Guten Morgen"]),
    ("alpaca_empty_input_unicode",
     {"instruction": "Name a prime.", "input": "", "output": "7 是质数。"},
     "alpaca",
     [_m("user", "Name a prime."), _m("assistant", "7 是质数。")],
     ["7 是质数。"]),
    ("alpaca_history_multiturn",
     {"instruction": "And 3+3?", "input": "  ", "output": "6",
      "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]]},
     "alpaca",
     [_m("user", "What is 1+1?"), _m("assistant", "2"), _m("user", "And 2+2?"),
      _m("assistant", "4"), _m("user", "And 3+3?"), _m("assistant", "6")],
     ["2", "4", "6"]),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def _prepare(tmp_path: Path, tok, rows: list, **kw):
    src = _write(tmp_path / "rows.jsonl", rows)
    report = prepare_dataset(DataConfig(source="file", path=str(src), **kw), tok, tmp_path / "out")
    return report, read_tokens(report.tokens_path).to_pylist()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_layout_becomes_the_same_messages(case):
    _, row, fmt, messages, _ = case
    assert detect_format(row) == fmt
    for asked in ("auto", fmt):
        assert conversation_from_row(row, asked).messages == messages


@pytest.mark.parametrize("template", ["paper", "tokenizer"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trained_tokens_decode_to_the_assistant_text(tmp_path, tok, case, template):
    _, row, fmt, messages, trained = case
    tok.chat_template = OWN_TEMPLATE
    try:
        _, [out] = _prepare(tmp_path, tok, [row], format=fmt, chat_template=template,
                            max_seq_len=1024)
        ids, mask = out["input_ids"], out["response_mask"]
        assert [tok.decode(r) for r in runs(ids, mask)] == [t + EOS for t in trained]
        if template == "paper":
            expected_text = render_paper(conversation_from_row({"messages": messages}), EOS).text
        else:
            expected_text = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(ids) == expected_text  # system turn, "\n\n" input join, turn order
    finally:
        tok.chat_template = None


# (row, format, reason, text the detail must hold: the field at fault)
BAD = [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     "sharegpt", "unknown_role", "conversations[1].from is 'bot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]},
     "sharegpt", "non_string_content", "conversations[1].value is int"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
     "sharegpt", "missing_fields", "conversations[1] needs 'from' and 'value'"),
    ({"conversations": [{"from": "human", "value": "hi"}]},
     "sharegpt", "no_assistant_turn", "'conversations'"),
    ({"conversations": "hi"}, "sharegpt", "missing_fields", "'conversations' must be a list"),
    ({"system": "A", "conversations": [{"from": "system", "value": "B"},
                                       {"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "x"}]},
     "sharegpt", "conflicting_system", "column 'system' and conversations[0]"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
      "noise_spans": []}, "sharegpt", "invalid_noise_spans", "this row is sharegpt"),
    ({"instruction": "Say hi.", "input": "", "output": "  "},
     "alpaca", "empty_assistant_content", "'output' is empty"),
    ({"instruction": 7, "output": "x"}, "alpaca", "non_string_content", "'instruction' is int"),
    ({"instruction": "", "input": "", "output": "x"}, "alpaca", "empty_user_content",
     "'instruction' and 'input' are both empty"),
    ({"instruction": "q", "output": "a", "history": [["only a question"]]},
     "alpaca", "invalid_history", "history[0] must be a [question, answer] pair"),
    ({"instruction": "q", "output": "a", "history": [["q0", ""]]},
     "alpaca", "empty_assistant_content", "history[0][1]"),
    ({"instruction": "q", "output": "a", "history": "q0"},
     "alpaca", "invalid_history", "'history' must be a list"),
    ({"messages": [_m("user", "hi"), _m("bot", "x")]},
     "messages", "unknown_role", "messages[1].role is 'bot'"),
    ({"messages": [_m("user", "hi"), {"role": "assistant"}]},
     "messages", "missing_fields", "messages[1] needs 'role' and 'content'"),
    ({"prompt": [_m("user", "hi")], "completion": ["x"]}, "prompt_completion", "missing_fields",
     "completion[0] needs 'role' and 'content'"),
    ({"prompt": "hi", "completion": [_m("assistant", "x")]}, "prompt_completion",
     "mixed_prompt_completion", "'prompt' is str and 'completion' is list"),
    ({"prompt": [_m("user", "hi")], "completion": [_m("user", "x")]}, "prompt_completion",
     "unknown_role", "completion[0] is a 'user' turn"),
    ({"prompt": "hi", "completion": 5}, "prompt_completion", "non_string_content",
     "'completion' is int"),
    ({"prompt": [_m("user", "hi"), _m("assistant", "ctx")], "completion": [_m("assistant", "x")],
      "noise_spans": [{"message": 1, "start": 0, "end": 2}]},
     "prompt_completion", "invalid_noise_spans", "message 1 is not a trained assistant turn"),
]


@pytest.mark.parametrize("row,fmt,reason,detail", BAD, ids=[f"{b[1]}-{b[2]}" for b in BAD])
def test_malformed_rows_are_rejected_naming_the_field(row, fmt, reason, detail):
    for asked in ("auto", fmt):
        with pytest.raises(RowRejected) as err:
            conversation_from_row(row, asked)
        assert err.value.reason == reason
        assert detail in err.value.detail


def test_a_row_of_no_layout_names_its_keys_and_the_layouts(tmp_path, tok):
    with pytest.raises(RowRejected) as err:
        detect_format({"question": "q", "answer": "a"})
    assert err.value.reason == "missing_fields"
    assert "its keys are ['answer', 'question']" in err.value.detail
    for fmt in FORMATS:
        assert fmt in err.value.detail
    assert "'instruction' + 'output'" in err.value.detail
    # forcing a layout names the column it needs
    with pytest.raises(RowRejected, match=r"format 'alpaca' needs column\(s\) \['instruction', "
                                          r"'output'\]; the row's keys are \['conversations'\]"):
        detect_format({"conversations": []}, fmt="alpaca")


def test_auto_reads_a_file_mixing_layouts_and_rejects_per_row(tmp_path, tok):
    rows = [c[1] for c in CASES] + [{"question": "q"}, BAD[0][0]]
    report, table = _prepare(tmp_path, tok, rows, max_rejected_fraction=0.5, max_seq_len=1024)
    assert [r["sample_id"] for r in table] == list(range(len(CASES)))
    for (_, _, _, _, trained), out in zip(CASES, table, strict=True):
        got = [tok.decode(r) for r in runs(out["input_ids"], out["response_mask"])]
        assert got == [t + EOS for t in trained]
    rejects = [json.loads(line) for line in report.rejects_path.read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(len(CASES), "missing_fields"),
                                                          (len(CASES) + 1, "unknown_role")]
    lines = describe_first_rows(DataConfig(source="file", path=str(tmp_path / "rows.jsonl")), n=20)
    assert lines[:len(CASES)] == [f"row {i}: {c[2]}" for i, c in enumerate(CASES)]
    assert lines[len(CASES)].startswith(f"row {len(CASES)}: rejected: missing_fields: row matches no")


def test_either_key_style_and_role_names_in_either_list_column():
    # LLaMA-Factory's sharegpt also reads OpenAI-style turns; hub sets put either in either
    openai_turns = [_m("user", "hi"), _m("assistant", "hello")]
    sharegpt_turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    for row in ({"conversations": openai_turns}, {"messages": sharegpt_turns}):
        assert conversation_from_row(row).messages == openai_turns


def test_noise_spans_still_mark_tokens_of_messages_rows(tmp_path, tok):
    row = {"messages": [_m("user", "What is 37 + 58?"), _m("assistant", "The answer is 95.")],
           "noise_spans": [{"message": 1, "start": 4, "end": 10}]}
    _, [out] = _prepare(tmp_path, tok, [row], max_seq_len=64)
    noisy = [t for t, m in zip(out["input_ids"], out["noise_mask"], strict=True) if m]
    assert tok.decode(noisy).strip() == "answer"


def test_columns_and_roles_map_other_names(tmp_path, tok):
    rows = [
        {"dialogue": [{"speaker": "human", "text": "hi"}, {"speaker": "bot", "text": "hello"}]},
        {"question": "2+2?", "answer": "4", "sys": "Be brief."},
        {"dialogue": [{"speaker": "human", "text": "hi"}, {"speaker": "robot", "text": "x"}]},
    ]
    cfg = DataConfig(source="file", path=str(_write(tmp_path / "rows.jsonl", rows)),
                     columns={"messages": "dialogue", "role": "speaker", "content": "text",
                              "instruction": "question", "output": "answer", "system": "sys"},
                     roles={"human": "user", "bot": "assistant"}, max_rejected_fraction=0.5)
    report = prepare_dataset(cfg, tok, tmp_path / "out")
    table = read_tokens(report.tokens_path).to_pylist()
    decoded = [tok.decode(r["input_ids"]) for r in table]
    assert decoded == ["<|user|>\nhi\n<|assistant|>\nhello" + EOS + "\n",
                       "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4" + EOS + "\n"]
    [reject] = [json.loads(line) for line in report.rejects_path.read_text().splitlines()]
    assert reject["row"] == 2 and reject["reason"] == "unknown_role"
    assert "dialogue[1].speaker is 'robot'" in reject["detail"] and "data.roles" in reject["detail"]
    assert describe_first_rows(cfg) == ["row 0: messages", "row 1: alpaca",
                                        f"row 2: rejected: unknown_role: {reject['detail']}"]
    # the tokenizer corpus reads the mapped columns too
    assert list(corpus_texts(cfg.path, columns=cfg.columns, roles=cfg.roles)) == [
        "hi\nhello", "Be brief.\n2+2?\n4"]


def test_corpus_texts_reads_sharegpt_and_alpaca_rows(tmp_path):
    src = _write(tmp_path / "rows.jsonl", [CASES[1][1], CASES[5][1]])
    assert list(corpus_texts(src)) == [
        "Réponds en français.\nBonjour, ça va ?\nTrès bien, merci ! 😊\nEt 2+2 ?\n2+2 = 4.",
        "You translate.\nTranslate to German.\n\nGood morning\nGuten Morgen"]


def test_columns_and_roles_are_validated_like_every_field():
    raw = {"name": "formats", "models": [{"name": "m", "family": "llama", "from_config": {}}],
           "data": {"source": "file", "path": "x.jsonl"}}

    def error(data: dict) -> str:
        with pytest.raises(ConfigError) as err:
            config_from_dict({**raw, "data": {**raw["data"], **data}})
        return str(err.value)

    assert "data.columns.instrucion: unknown key (did you mean 'instruction'?)" in error(
        {"columns": {"instrucion": "question"}})
    assert "bot: 'asistant' is not a role (did you mean 'assistant'?)" in error(
        {"roles": {"bot": "asistant"}})
    assert "data.format" in error({"format": "sharegtp"})
    cfg = config_from_dict({**raw, "data": {**raw["data"], "format": "sharegpt",
                                            "columns": {"conversations": "turns"}}})
    assert cfg.data.columns.conversations == "turns" and cfg.data.columns.role is None


def test_validate_prints_the_format_of_the_first_rows(tmp_path, capsys):
    from orchestrator.cli import main

    src = _write(tmp_path / "rows.jsonl", [CASES[1][1], CASES[5][1], {"question": "q"}])
    config = tmp_path / "c.yaml"
    config.write_text("name: formats\nmodels: [{name: m, family: llama, from_config: {}}]\n")
    assert main(["validate", str(config), "data.source=file", f"data.path={src}"]) == 0
    out = capsys.readouterr().out
    assert "# data (format auto): row 0: sharegpt\n# data (format auto): row 1: alpaca\n" in out
    assert "# data (format auto): row 2: rejected: missing_fields: row matches no format" in out
    assert load_config(REPO / "configs/demo.yaml").data.columns is None  # shipped: unchanged
