"""Character spans -> per-token masks, using the tokenizer's offsets on the full text.

Rule (one rule for response and noise masks): a token is in a mask iff its character span
[start, end) overlaps a marked span by at least one character. Consequences:
- a token that straddles a boundary (part prompt/tag, part response) IS in the response
  mask: no response character is ever left out of the training targets, and the EOS is
  always trained;
- tokens with an empty span (BOS/EOS added by the tokenizer's post-processor report
  (0, 0)) are never in a mask: they are not text of any turn.
With the usual pre-tokenizers (ByteLevel, SentencePiece, Metaspace) tokens never cross a
newline or a special token, so with the paper template straddling does not happen in
practice; the rule matters for unusual tokenizers and templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.data.chat_format import FormattedSample, Span


def spans_to_token_mask(offsets: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    """int8 [n] mask: 1 where token i's [start, end) overlaps any span (see module rule)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    non_empty = ends > starts
    for s, e in spans:
        mask |= non_empty & (starts < e) & (ends > s)
    return mask.astype(np.int8)


@dataclass
class TokenizedSample:
    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # int8
    noise_mask: np.ndarray | None  # int8, None when the sample had no noise annotation
    truncated: bool


def tokenize_samples(
    tokenizer: Any,
    samples: Sequence[FormattedSample],
    max_seq_len: int,
    add_special_tokens: bool,
) -> list[TokenizedSample]:
    """Tokenize whole texts in one batch call, derive masks, keep the first max_seq_len tokens.

    Truncation happens after the masks are computed so that a cut never shifts a boundary;
    the caller rejects samples whose response mask ends up empty.
    """
    if not samples:
        return []
    enc = tokenizer(
        [s.text for s in samples],
        return_offsets_mapping=True,
        add_special_tokens=add_special_tokens,
        truncation=False,
    )
    out = []
    for sample, ids, offs in zip(samples, enc["input_ids"], enc["offset_mapping"], strict=True):
        offsets = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        ids_arr = np.asarray(ids, dtype=np.int32)
        response = spans_to_token_mask(offsets, sample.response_spans)
        noise = None
        if sample.noise_spans is not None:
            # noise is ground truth about trained text only: restrict to response tokens
            noise = spans_to_token_mask(offsets, sample.noise_spans) & response
        truncated = len(ids_arr) > max_seq_len
        if truncated:
            ids_arr, response = ids_arr[:max_seq_len], response[:max_seq_len]
            noise = None if noise is None else noise[:max_seq_len]
        out.append(TokenizedSample(ids_arr, response, noise, truncated))
    return out
