"""Tokenizers: a byte-level BPE trained locally, and hub/local loading with per-family pad fixes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX,
)

from orchestrator.config import ModelSpec

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TAGS = ("<|user|>", "<|assistant|>", "<|system|>")
# Trained first, so their ids are fixed: eos/bos 0, pad 1, then the chat tags
# (families.TRAINED_TOKENIZER_IDS relies on this order).
TRAINED_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHAT_TAGS)

# The paper's (Tulu) chat layout, so `data.chat_template: tokenizer` also works with a
# trained tokenizer: "<|role|>\ncontent\n", the assistant turn closed by EOS.
TRAINED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Llama-3 tokenizers ship without a pad token but reserve ids that are never produced by
# text; Llama-3.1+ names one for exactly this purpose. Padding with one of these (rather than
# EOS) keeps "pad" and "end of response" distinguishable by id.
LLAMA_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
QWEN2_PAD = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path | None = None,
    *,
    family: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (offline) and wrap it for transformers.

    Byte-level means any input string is encodable (no unknown token). The special tokens and
    chat tags are added tokens: they are matched before pre-tokenization, so a tag is always
    one token and never merges with neighbouring content. `vocab_size` is an upper bound:
    a small corpus may give fewer merges; use `len(tokenizer)` as the model's vocabulary.

    family="qwen2" trains with Qwen2's pre-tokenization (NFC, Qwen2's split regex, byte-level
    without GPT-2's regex). This is required, not cosmetic: transformers' AutoTokenizer loads
    any folder whose config.json says qwen2 as Qwen2Tokenizer, which rebuilds that pipeline
    around the saved vocabulary and merges; a GPT-2-style tokenizer saved next to a qwen2
    model would then tokenize differently after loading than it did when trained.
    """
    if vocab_size < 256 + len(TRAINED_SPECIAL_TOKENS):
        raise ValueError(
            f"tokenizer vocab_size must be >= {256 + len(TRAINED_SPECIAL_TOKENS)} "
            f"(256 bytes + {len(TRAINED_SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.decoder = decoders.ByteLevel()
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # No post-processor: Qwen2Tokenizer has none either, and without one the offsets
        # already tile the text (see below).
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # trim_offsets=False: each token's span includes its leading space, so the offsets
        # tile the text with no gaps and every character maps to exactly one token (what the
        # data stage needs to turn character spans such as noise spans into token masks).
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,  # GPT-2 style: one document separator serves as bos and eos
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(CHAT_TAGS),
        padding_side="right",
    )
    tokenizer.chat_template = TRAINED_CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _tokenizer_source(spec: ModelSpec, path: str | None) -> tuple[str, str | None]:
    """(where to load from, revision): an explicit path wins, then spec.tokenizer, then
    spec.pretrained. The revision pins the pretrained checkpoint, so it applies only when
    the source is spec.pretrained (also when a caller passes that id as `path`)."""
    if path is not None:
        source = str(path)
    elif spec.tokenizer is not None and spec.tokenizer != "train":
        source = spec.tokenizer
    elif spec.tokenizer is None and spec.pretrained is not None:
        source = spec.pretrained
    else:
        raise ValueError(
            f"model '{spec.name}': tokenizer is 'train' (trained on the corpus), so "
            "load_tokenizer needs the path it was saved to (the materialized base model folder)"
        )
    return source, spec.revision if source == spec.pretrained else None


def fix_pad_token(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token the family's way, in place; padding on the right.

    Never adds a token to the vocabulary: that would silently change the model's embedding
    size. A pad equal to EOS is acceptable because collate and scoring mask padding with the
    attention mask, never by token id.
    """
    vocab = tokenizer.get_vocab()
    if spec.pad_token is not None:
        # Explicit override beats any family rule.
        if spec.pad_token not in vocab:
            raise ValueError(
                f"model '{spec.name}': pad_token {spec.pad_token!r} is not in the tokenizer's "
                "vocabulary; pick an existing token (e.g. its EOS) or leave pad_token unset"
            )
        tokenizer.pad_token = spec.pad_token
    elif tokenizer.pad_token is None:
        if spec.family == "llama":
            # Llama-3: a reserved pad-like token when present (see LLAMA_PAD_CANDIDATES);
            # Llama-2 style vocabularies have none of these, so EOS.
            found = [t for t in LLAMA_PAD_CANDIDATES if t in vocab]
            tokenizer.pad_token = found[0] if found else tokenizer.eos_token
        elif spec.family == "qwen2":
            # Qwen2.5 already sets pad = <|endoftext|> (and uses <|im_end|> as the chat EOS), so
            # we only get here for a stripped-down tokenizer: restore that convention.
            tokenizer.pad_token = QWEN2_PAD if QWEN2_PAD in vocab else tokenizer.eos_token
        else:
            # GPT-Neo (GPT-2 vocabulary) has only <|endoftext|>: pad with EOS, as is standard.
            tokenizer.pad_token = tokenizer.eos_token
    # An existing pad token (e.g. Qwen2.5's <|endoftext|>, our trained <|pad|>) is kept.
    if tokenizer.pad_token is None:
        raise ValueError(
            f"model '{spec.name}': the tokenizer has neither a pad nor an EOS token; "
            "set pad_token in the model spec"
        )
    # Right padding for training: targets sit at the start of each row and position ids
    # (0, 1, ...) need no correction. Generation code that wants left padding sets it itself.
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(spec: ModelSpec, path: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of `spec` (from `path` if given) and fix its pad token per family."""
    source, revision = _tokenizer_source(spec, path)
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return fix_pad_token(tokenizer, spec)
