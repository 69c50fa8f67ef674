"""Source row layouts -> one validated list of chat messages (role / content).

Every layout is normalised into `messages` (roles system / user / assistant) here, before
the chat template is applied (chat_format.py), so templating, masks and noise spans have a
single input shape. The layouts (`data.format`; README "Your data"):

- messages: {"messages": [{"role", "content"}, ...]}: TRL's conversational rows.
- sharegpt: {"conversations": [{"from", "value"}, ...], "system"?}: Vicuna / ShareGPT dumps,
  LLaMA-Factory's sharegpt (roles human / gpt / system; a top-level `system` column becomes
  the first system turn).
- prompt_completion: {"prompt", "completion"}: TRL's prompt-completion rows, as strings or
  (conversational) as message lists; of a conversational row only the completion is trained.
- alpaca: {"instruction", "input"?, "output", "system"?, "history"?}: Stanford Alpaca,
  LLaMA-Factory's alpaca. User turn = instruction + "\\n\\n" + input (when input is not
  blank); `history` [question, answer] pairs become earlier turns, their answers trained.
- auto (the default): each row's layout is found from its keys, in the order above.

`data.columns` renames the columns / message keys (LLaMA-Factory's dataset_info `columns`
and `tags`), `data.roles` adds role names (`{bot: assistant}`). Every reject names the
row's own field (`conversations[2].from`), so the reason can be found in the source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.data.errors import RowRejected

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")  # also auto's order
# Column names (data.columns' keys) and their defaults. `role` / `content` name the keys
# inside a message; None = the layout's own (role / content, sharegpt: from / value).
COLUMNS: dict[str, str | None] = {
    "messages": "messages", "conversations": "conversations", "role": None, "content": None,
    "system": "system", "prompt": "prompt", "completion": "completion",
    "instruction": "instruction", "input": "input", "output": "output", "history": "history",
}
_MESSAGE_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}
# Role names every message list understands: the three roles, and the human / gpt of
# ShareGPT dumps (LLaMA-Factory's sharegpt defaults), whichever key style the turns use.
KNOWN_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
               "human": "user", "gpt": "assistant"}
_MAX_KEYS_SHOWN = 20


@dataclass(frozen=True)
class RowMessages:
    """A row as messages. `context_turns`: assistant turns that are context, not trained
    (the prompt side of a conversational prompt_completion row)."""

    format: str
    messages: list[dict[str, str]]
    context_turns: frozenset[int] = field(default_factory=frozenset)


def column_names(columns: Any = None) -> dict[str, str | None]:
    """The column names in effect: defaults, overridden by data.columns (a config section
    or a mapping) where it sets one."""
    names = dict(COLUMNS)
    given = columns.model_dump() if hasattr(columns, "model_dump") else dict(columns or {})
    names.update({k: v for k, v in given.items() if v is not None})
    return names


def _keys(row: Mapping[str, Any]) -> str:
    keys = sorted(str(k) for k in row)
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return f"{keys[:_MAX_KEYS_SHOWN]}{more}"


def _present(row: Mapping[str, Any], key: str | None) -> bool:
    return key is not None and row.get(key) is not None


def _needs(fmt: str, names: dict[str, str | None]) -> list[str]:
    """The columns a row must hold to be read as `fmt`."""
    return {"messages": [names["messages"]], "sharegpt": [names["conversations"]],
            "prompt_completion": [names["prompt"], names["completion"]],
            "alpaca": [names["instruction"], names["output"]]}[fmt]


def format_of_keys(row: Mapping[str, Any], columns: Any = None) -> str:
    """The layout a row's keys say it has (the first of FORMATS whose columns it holds);
    RowRejected("missing_fields") naming its keys and the layouts accepted when none."""
    names = column_names(columns)
    for fmt in FORMATS:
        if all(_present(row, k) for k in _needs(fmt, names)):
            return fmt
    accepted = ", ".join(f"{f} ({' + '.join(repr(k) for k in _needs(f, names))})" for f in FORMATS)
    raise RowRejected("missing_fields", f"row matches no format: its keys are {_keys(row)}; "
                      f"accepted: {accepted} (data.columns maps other names)")




def _message(msg: Any, where: str, keys: tuple[str, str], alt: tuple[str, str] | None,
             role_map: dict[str, str]) -> dict[str, str]:
    if isinstance(msg, dict) and alt is not None and not all(k in msg for k in keys) \
            and all(k in msg for k in alt):
        keys = alt  # {role, content} in a sharegpt column, or {from, value} in `messages`
    role_key, content_key = keys
    if not isinstance(msg, dict) or role_key not in msg or content_key not in msg:
        has = _keys(msg) if isinstance(msg, dict) else type(msg).__name__
        raise RowRejected("missing_fields", f"{where} needs {role_key!r} and {content_key!r} "
                          f"keys (has {has})")
    raw_role, content = msg[role_key], msg[content_key]
    role = role_map.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise RowRejected("unknown_role", f"{where}.{role_key} is {raw_role!r}; known: "
                          f"{sorted(role_map)} (data.roles maps other names)")
    if not isinstance(content, str):
        raise RowRejected("non_string_content",
                          f"{where}.{content_key} is {type(content).__name__}, not a string")
    if role == "assistant" and not content.strip():
        raise RowRejected("empty_assistant_content", f"{where} (assistant) has empty {content_key!r}")
    return {"role": role, "content": content}


def _turns(raw: Any, column: str, fmt: str, names: dict[str, str | None],
           roles: Mapping[str, str] | None) -> list[dict[str, str]]:
    """A message list column -> messages (roles mapped, contents checked)."""
    if not isinstance(raw, list):
        raise RowRejected("missing_fields", f"{column!r} must be a list of messages, "
                          f"got {type(raw).__name__}")
    if not raw:
        raise RowRejected("empty_messages", f"{column!r} is an empty list")
    own = _MESSAGE_KEYS["sharegpt" if fmt == "sharegpt" else "messages"]
    configured = (names["role"] or own[0], names["content"] or own[1])
    other = None
    if names["role"] is None and names["content"] is None:
        other = _MESSAGE_KEYS["messages" if fmt == "sharegpt" else "sharegpt"]
    role_map = {**KNOWN_ROLES, **(roles or {})}
    return [_message(m, f"{column}[{i}]", configured, other, role_map) for i, m in enumerate(raw)]


def _need_assistant(messages: list[dict[str, str]], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("no_assistant_turn", f"no turn of {where} is an assistant turn")


def _text(row: Mapping[str, Any], key: str, *, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowRejected("missing_fields", f"{key!r} is missing (row keys: {_keys(row)})")
        return ""
    if not isinstance(value, str):
        raise RowRejected("non_string_content", f"{key!r} is {type(value).__name__}, not a string")
    return value


def _with_system(row: Mapping[str, Any], names: dict[str, str | None],
                 messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    """A top-level system column as the first turn (blank = none). A conversation that
    opens with its own, different system turn is rejected: one of the two would be lost."""
    key = str(names["system"])
    system = _text(row, key, required=False)
    if not system.strip():
        return messages
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] == system:
            return messages
        raise RowRejected("conflicting_system", f"column {key!r} and {where}[0] (a system turn) "
                          "differ; keep one of them")
    return [{"role": "system", "content": system}, *messages]


def _messages_row(row: Mapping[str, Any], names: dict[str, str | None],
                  roles: Mapping[str, str] | None) -> RowMessages:
    column = str(names["messages"])
    messages = _turns(row.get(column), column, "messages", names, roles)
    _need_assistant(messages, repr(column))
    return RowMessages("messages", messages)


def _sharegpt_row(row: Mapping[str, Any], names: dict[str, str | None],
                  roles: Mapping[str, str] | None) -> RowMessages:
    column = str(names["conversations"])
    messages = _with_system(row, names, _turns(row.get(column), column, "sharegpt", names, roles),
                            column)
    _need_assistant(messages, repr(column))
    return RowMessages("sharegpt", messages)


def _prompt_completion_row(row: Mapping[str, Any], names: dict[str, str | None],
                           roles: Mapping[str, str] | None) -> RowMessages:
    pk, ck = str(names["prompt"]), str(names["completion"])
    prompt, completion = row.get(pk), row.get(ck)
    if isinstance(prompt, list) != isinstance(completion, list):
        raise RowRejected("mixed_prompt_completion", f"{pk!r} is {type(prompt).__name__} and "
                          f"{ck!r} is {type(completion).__name__}: both strings, or both "
                          "message lists (TRL's conversational form)")
    if isinstance(prompt, list):  # TRL's conversational form: only the completion is trained
        context = _turns(prompt, pk, "messages", names, roles) if prompt else []
        answer = _turns(completion, ck, "messages", names, roles)
        for i, m in enumerate(answer):
            if m["role"] != "assistant":
                raise RowRejected("unknown_role", f"{ck}[{i}] is a {m['role']!r} turn; a "
                                  "completion holds assistant turns")
        untrained = frozenset(i for i, m in enumerate(context) if m["role"] == "assistant")
        return RowMessages("prompt_completion", context + answer, untrained)
    prompt, completion = _text(row, pk, required=True), _text(row, ck, required=True)
    if not completion.strip():
        raise RowRejected("empty_assistant_content", f"{ck!r} is empty")
    return RowMessages("prompt_completion", [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": completion}])


def _history(row: Mapping[str, Any], key: str) -> list[dict[str, str]]:
    raw = row.get(key)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RowRejected("invalid_history", f"{key!r} must be a list of [question, answer] "
                          f"pairs, got {type(raw).__name__}")
    turns: list[dict[str, str]] = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise RowRejected("invalid_history", f"{key}[{i}] must be a [question, answer] "
                              f"pair of strings, got {str(pair)[:80]}")
        if not pair[1].strip():
            raise RowRejected("empty_assistant_content", f"{key}[{i}][1] (an answer) is empty")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _alpaca_row(row: Mapping[str, Any], names: dict[str, str | None]) -> RowMessages:
    ik, xk, ok = str(names["instruction"]), str(names["input"]), str(names["output"])
    instruction, output = _text(row, ik, required=True), _text(row, ok, required=True)
    extra = _text(row, xk, required=False)
    user = "\n\n".join(p for p in (instruction, extra) if p.strip())
    if not user:
        raise RowRejected("empty_user_content", f"{ik!r} and {xk!r} are both empty")
    if not output.strip():
        raise RowRejected("empty_assistant_content", f"{ok!r} is empty")
    turns = _history(row, str(names["history"])) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return RowMessages("alpaca", _with_system(row, names, turns, "the turns"))


def row_to_messages(row: Any, fmt: str = "auto", columns: Any = None,
                    roles: Mapping[str, str] | None = None) -> RowMessages:
    """One source row in layout `fmt` (auto: found from its keys) as validated messages;
    RowRejected with a reason code and the field at fault otherwise."""
    if not isinstance(row, dict):
        raise RowRejected("not_an_object", f"row is {type(row).__name__}, not a JSON object")
    names = column_names(columns)
    if fmt == "auto":
        fmt = format_of_keys(row, columns)
    elif fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    else:
        missing = [k for k in _needs(fmt, names) if not _present(row, k)]
        if missing:
            raise RowRejected("missing_fields", f"format {fmt!r} needs column(s) {missing}; "
                              f"the row's keys are {_keys(row)}")
    if fmt == "messages":
        return _messages_row(row, names, roles)
    if fmt == "sharegpt":
        return _sharegpt_row(row, names, roles)
    if fmt == "prompt_completion":
        return _prompt_completion_row(row, names, roles)
    return _alpaca_row(row, names)


def detect_format(row: Any, columns: Any = None, roles: Mapping[str, str] | None = None,
                  fmt: str = "auto") -> str:
    """The layout `row` is read as (one of FORMATS), after checking that it converts: the
    check `lethe validate` prints and a preflight can run on a dataset's first rows.
    Raises RowRejected (`.reason` a stable code, `.detail` naming the field; str() gives
    both) when the row matches no layout or is malformed in the one it matches."""
    return row_to_messages(row, fmt, columns, roles).format


def row_texts(row: Any, columns: Any = None, roles: Mapping[str, str] | None = None) -> list[str]:
    """The message contents of a row in any layout ([] when it is malformed): text for a
    tokenizer corpus, which needs no validation."""
    try:
        return [m["content"] for m in row_to_messages(row, "auto", columns, roles).messages]
    except RowRejected:
        return []


def describe_first_rows(data: Any, n: int = 5) -> list[str]:
    """`row <i>: <layout>` (or `row <i>: rejected: <reason>: <detail>`) for the first `n`
    rows of a local data file (data.path), as the run would read them; [] for other
    sources, which are not opened here."""
    from itertools import islice
    from pathlib import Path

    from orchestrator.data.errors import DataError
    from orchestrator.data.loading import iter_path_rows

    if data.source == "synthetic" or not data.path or not Path(data.path).is_file():
        return []
    lines = []
    try:
        for i, row in enumerate(islice(iter_path_rows(data.path, data.split, data.max_row_chars), n)):
            try:
                if isinstance(row, RowRejected):
                    raise row
                fmt = detect_format(row, data.columns, data.roles, data.format)
                lines.append(f"row {i}: {fmt}")
            except RowRejected as rej:
                lines.append(f"row {i}: rejected: {rej}")
    except DataError as exc:
        lines.append(f"cannot read {data.path}: {exc}")
    return lines
