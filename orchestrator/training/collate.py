"""Micro-batch collation: pad to the longest row, shift the class column like labels.

The class column travels with the batch: one call pads input_ids, attention_mask and
token_class together, then shifts targets and classes through the method core's helpers
(`shift_targets`, `shift_aligned`), the only place alignment changes. Every token of every
row survives, including the last token of the longest row (the paper's code dropped it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from orchestrator.method.token_loss import shift_aligned, shift_targets

IGNORE_INDEX = -100


def pad_rows(
    ids: Sequence[np.ndarray], classes: Sequence[np.ndarray], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad rows to the longest: (input_ids long, attention_mask long, class int8)."""
    if not ids:
        raise ValueError("cannot collate an empty micro-batch")
    longest = max(len(r) for r in ids)
    n = len(ids)
    input_ids = np.full((n, longest), pad_id, dtype=np.int64)
    attention = np.zeros((n, longest), dtype=np.int64)
    cls = np.zeros((n, longest), dtype=np.int8)  # padding is class 0: never trained
    for i, (r, c) in enumerate(zip(ids, classes, strict=True)):
        input_ids[i, : len(r)] = r
        attention[i, : len(r)] = 1
        cls[i, : len(c)] = c
    return torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(cls)


def collate(
    ids: Sequence[np.ndarray], classes: Sequence[np.ndarray], pad_id: int
) -> dict[str, Tensor]:
    """A training micro-batch.

    `labels[:, t]` is the token predicted at position t (input_ids[:, t+1]) where that token
    is trained (class != 0), else IGNORE_INDEX; `target_class[:, t]` is that token's class,
    shifted exactly like the labels. The last column has no target.
    """
    input_ids, attention_mask, cls = pad_rows(ids, classes, pad_id)
    labels = shift_targets(input_ids, cls != 0, ignore_index=IGNORE_INDEX)
    target_class = shift_aligned(cls, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "target_class": target_class,
    }

