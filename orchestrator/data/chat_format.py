"""Chat formatting: a source row -> text + character spans.

Rows in every layout (messages, sharegpt, prompt_completion, alpaca) are first normalised
into validated messages by `row_formats.py`; this module adds the noise spans and renders.

The output of this module is character-level: the full conversation text, the spans of
every assistant turn's trained part, and the ground-truth noise spans. Token masks are
derived from these spans with the tokenizer's offsets (`token_masks.py`), so the mask is
decided on the real token boundaries of the full text, never on separately tokenized
pieces whose boundaries can differ.

Template "paper" is the open-instruct / Tulu format the method's authors trained with:

    <|system|>\\n{content}\\n   <|user|>\\n{content}\\n   <|assistant|>\\n{content}{eos}\\n

The trained span of an assistant turn is `{content}{eos}`. Content is used verbatim (not
stripped, unlike open-instruct) so that character spans given in the data stay valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.data.errors import DataError, RowRejected
from orchestrator.data.row_formats import ROLES, RowMessages, row_to_messages

ROLE_TAGS = {role: f"<|{role}|>\n" for role in ROLES}

Span = tuple[int, int]


@dataclass(frozen=True)
class Conversation:
    """A validated row: messages plus optional noise spans relative to message content."""

    messages: list[dict[str, str]]
    # (message index, start, end) relative to that message's content; None = row has no
    # noise annotation at all (as opposed to [] = annotated and clean).
    noise_spans: list[tuple[int, int, int]] | None
    source_id: str | None
    # assistant turns that are context, not trained (a conversational prompt's own turns)
    context_turns: frozenset[int] = field(default_factory=frozenset)

    def trained(self, i: int) -> bool:
        """Whether message i's content (+ end marker) is a training target."""
        return self.messages[i]["role"] == "assistant" and i not in self.context_turns


@dataclass(frozen=True)
class FormattedSample:
    text: str
    response_spans: list[Span]  # absolute char spans of assistant content (+ end marker)
    noise_spans: list[Span] | None  # absolute char spans, None when the row had none


# ----------------------------------------------------------------------------- validation


def _check_noise_spans(raw: Any, parsed: RowMessages) -> list[tuple[int, int, int]]:
    messages = parsed.messages
    if not isinstance(raw, list):
        raise RowRejected("invalid_noise_spans", f"'noise_spans' must be a list, got {type(raw).__name__}")
    spans = []
    for j, span in enumerate(raw):
        try:
            m, s, e = int(span["message"]), int(span["start"]), int(span["end"])
        except (TypeError, KeyError, ValueError):
            raise RowRejected(
                "invalid_noise_spans", f"noise span {j} needs integer 'message', 'start', 'end'"
            ) from None
        if (not 0 <= m < len(messages) or messages[m]["role"] != "assistant"
                or m in parsed.context_turns):
            raise RowRejected("invalid_noise_spans",
                              f"noise span {j}: message {m} is not a trained assistant turn")
        if not 0 <= s < e <= len(messages[m]["content"]):
            raise RowRejected(
                "invalid_noise_spans",
                f"noise span {j}: [{s}, {e}) is outside message {m}'s {len(messages[m]['content'])} chars",
            )
        spans.append((m, s, e))
    return spans


def conversation_from_row(row: Any, fmt: str = "auto", columns: Any = None,
                          roles: Mapping[str, str] | None = None) -> Conversation:
    """Validate one source row in layout `fmt` (auto / messages / sharegpt /
    prompt_completion / alpaca; row_formats.py, with data.columns and data.roles); raise
    RowRejected. Noise spans are read on messages and prompt_completion rows only, whose
    message numbers are the row's own (sharegpt and alpaca rows gain turns here)."""
    parsed = row_to_messages(row, fmt, columns, roles)
    raw_noise = row.get("noise_spans")
    if raw_noise is not None and parsed.format not in ("messages", "prompt_completion"):
        raise RowRejected("invalid_noise_spans", f"noise_spans are read on messages and "
                          f"prompt_completion rows only; this row is {parsed.format}")
    noise = None if raw_noise is None else _check_noise_spans(raw_noise, parsed)
    source_id = row.get("id")
    return Conversation(parsed.messages, noise, None if source_id is None else str(source_id),
                        parsed.context_turns)


# ----------------------------------------------------------------------------- templates


def _absolute_noise(conv: Conversation, content_starts: dict[int, int | None]) -> list[Span] | None:
    if conv.noise_spans is None:
        return None
    out = []
    for m, s, e in conv.noise_spans:
        base = content_starts.get(m)
        if base is None:
            raise RowRejected(
                "noise_spans_unmappable",
                f"message {m}'s content does not appear verbatim in the chat-template text",
            )
        out.append((base + s, base + e))
    return out


def render_paper(conv: Conversation, eos_token: str) -> FormattedSample:
    """The paper (Tulu) template; the trained span of each assistant turn is content + eos."""
    parts: list[str] = []
    pos = 0
    spans: list[Span] = []
    content_starts: dict[int, int | None] = {}
    for i, msg in enumerate(conv.messages):
        tag = ROLE_TAGS[msg["role"]]
        body = msg["content"] + (eos_token if msg["role"] == "assistant" else "")
        content_starts[i] = pos + len(tag)
        if conv.trained(i):
            spans.append((pos + len(tag), pos + len(tag) + len(body)))
        piece = tag + body + "\n"
        parts.append(piece)
        pos += len(piece)
    return FormattedSample("".join(parts), spans, _absolute_noise(conv, content_starts))


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _apply_template_row(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """`_apply_template` for one source row: a template that raises on this row (Llama-2 /
    Mistral `raise_exception('Conversation roles must alternate ...')`, a missing key) rejects
    the row with the template's message instead of stopping the run."""
    try:
        return _apply_template(tokenizer, messages, generation_prompt)
    except MemoryError:
        raise
    except Exception as exc:  # jinja2 TemplateError and whatever a template's code raises
        raise RowRejected("chat_template_error", f"the tokenizer's chat template raised "
                          f"{type(exc).__name__}: {exc}") from None


def render_with_tokenizer(conv: Conversation, tokenizer: Any) -> FormattedSample:
    """The tokenizer's own chat template; assistant spans found by prefix differences.

    For assistant turn i: `before` = render(messages[:i], generation prompt) and `upto` =
    render(messages[:i + 1]). The trained span starts where the content starts inside
    upto[len(before):] (so a role header the template adds is excluded) and ends at the
    end of `upto` minus trailing whitespace (so the template's end-of-turn marker is
    trained, as the paper trains eos, but the newline after it is not).
    """
    full = _apply_template_row(tokenizer, conv.messages, False)
    spans: list[Span] = []
    content_starts: dict[int, int | None] = {}
    for i, msg in enumerate(conv.messages):
        if not conv.trained(i):
            continue
        before = _apply_template_row(tokenizer, conv.messages[:i], True)
        upto = _apply_template_row(tokenizer, conv.messages[: i + 1], False)
        if not upto.startswith(before):
            before = _apply_template_row(tokenizer, conv.messages[:i], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise RowRejected(
                "template_not_incremental",
                f"rendering messages[:{i + 1}] is not a prefix of the full conversation text; "
                "the chat template rewrites earlier turns, so prefix differences cannot find turn spans",
            )
        turn = upto[len(before):]
        offset = turn.find(msg["content"])
        content_starts[i] = len(before) + offset if offset >= 0 else None
        if offset < 0:  # templates often trim content: locate the trimmed text instead
            offset = max(turn.find(msg["content"].strip()), 0)
        start = len(before) + offset
        end = max(start, len(upto.rstrip()))
        spans.append((start, end))
    return FormattedSample(full, spans, _absolute_noise(conv, content_starts))


def check_tokenizer_for_template(tokenizer: Any, template: str) -> None:
    """Fail early (DataError) when the tokenizer cannot serve the chosen template."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; character offsets "
            "(return_offsets_mapping) are needed to build response masks"
        )
    if template == "paper" and not tokenizer.eos_token:
        raise DataError("data.chat_template='paper' needs the tokenizer's eos_token, which is not set")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.chat_template='tokenizer' but the tokenizer has no chat_template; "
            "use data.chat_template=paper or give the tokenizer a template"
        )
    if template not in ("paper", "tokenizer"):
        raise DataError(f"data.chat_template={template!r}; allowed: 'paper', 'tokenizer'")


def format_sample(conv: Conversation, tokenizer: Any, template: str) -> FormattedSample:
    if template == "paper":
        return render_paper(conv, tokenizer.eos_token)
    return render_with_tokenizer(conv, tokenizer)


def format_prompt(
    messages: list[dict[str, str]],
    template: str = "paper",
    tokenizer: Any = None,
    eos_token: str | None = None,
) -> str:
    """The generation prompt for a conversation so far, identical to the training format.

    Paper template: the formatted turns followed by `<|assistant|>\\n`. Earlier assistant
    turns end with the EOS text (from `eos_token`, else `tokenizer.eos_token`). Template
    "tokenizer": `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.
    """
    if template == "tokenizer":
        if tokenizer is None:
            raise ValueError("format_prompt(template='tokenizer') needs a tokenizer")
        check_tokenizer_for_template(tokenizer, "tokenizer")
        return _apply_template(tokenizer, messages, True)
    if template != "paper":
        raise ValueError(f"unknown chat template {template!r}; allowed: 'paper', 'tokenizer'")
    eos = eos_token if eos_token is not None else getattr(tokenizer, "eos_token", None)
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; allowed: {list(ROLES)}")
        if role == "assistant" and eos is None:
            raise ValueError("format_prompt: history has an assistant turn; pass eos_token or tokenizer")
        end = eos if role == "assistant" else ""
        out.append(f"{ROLE_TAGS[role]}{msg['content']}{end}\n")
    out.append(ROLE_TAGS["assistant"])
    return "".join(out)
