"""The training objective: plain SFT, *ignore* (positives only) and *forget* (the paper).

The forgetting objective of Taheri et al., "Forgetting: A New Mechanism Towards Better
Large Language Model Fine-tuning" (TMLR 2026, arXiv 2508.04329): learn the positive tokens
by the usual CE and forget the negative ones by gradient ascent on their CE, weighted by
lambda(step) (method/schedules.py). The positive / negative split is the partition's
(method/partition.py) of the score CE_base - CE_ref (method/score.py).

    forget, ascent (paper):  L = sum_pos CE / n_pos  -  lam * sum_neg CE / n_neg
    forget, unlikelihood:    L = sum_pos CE / n_pos  +  lam * sum_neg -log(1 - p) / n_neg,
                             p = exp(-CE), the model's probability of the negative token.

Counting convention (the same for every mode, so callers never count per mode): `n_pos`
counts class +1 tokens and `n_neg` class -1 tokens. "sft" trains on every token with
class != 0 and divides by n_pos + n_neg; "ignore" trains on class +1 only.

Normalisation:
- "micro_batch" (the paper's released code): n_* are this call's counts, so the means are
  per micro-batch and per rank; a class with no tokens contributes 0.
- "global" (Lethe's default, an engineering choice: configs/paper/*.yaml say so beside the
  value): n_* are caller-supplied counts over every micro-batch of the optimizer step and
  every data-parallel rank, so the step's gradient does not depend on how the global batch
  is cut into micro-batches and ranks. The caller multiplies the loss by
  (world_size * grad_accum) so that DDP/DeepSpeed gradient averaging (divide by world_size,
  and by grad_accum) gives back exactly the mean over the whole global batch.

Pure torch (method core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.names import METHODS, NEGATIVE_TERMS, NORMALIZATIONS

# The names are declared once, in orchestrator/names.py (plain typing, no Ray or pydantic).
MODES = METHODS

# Floor on (1 - p) in the unlikelihood term: p -> 1 (CE -> 0) would give -log(0) = inf.
# The floor caps the term at -log(1e-6) ~= 13.8 (and zeroes its gradient beyond the cap).
UNLIKELIHOOD_MIN_ONE_MINUS_P = 1e-6


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar to backprop
    pos_loss: Tensor  # detached mean CE over class +1 tokens in this call (nan if none)
    neg_loss: Tensor  # detached mean CE over class -1 tokens in this call (nan if none)
    n_pos: int
    n_neg: int


def unlikelihood_term(token_ce: Tensor) -> Tensor:
    """-log(1 - exp(-CE)), stable for small CE and finite (clamped) as CE -> 0."""
    one_minus_p = -torch.expm1(-token_ce.float())
    return -torch.log(one_minus_p.clamp_min(UNLIKELIHOOD_MIN_ONE_MINUS_P))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _denominator(
    name: str, local: int, global_count: float | None, normalization: str
) -> float:
    """The count a class sum is divided by (0 means: the class contributes nothing)."""
    if normalization == "micro_batch":
        return float(local)
    if global_count is None:
        raise ValueError(f"normalization 'global' needs {name} (the count over all ranks and "
                         "micro-batches of the optimizer step)")
    g = float(global_count)
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"{name} must be a finite count >= 0, got {global_count!r}")
    if g < local:
        raise ValueError(f"{name}={global_count!r} is smaller than this call's own count {local}")
    return g


def _mean(total: Tensor, count: float) -> Tensor:
    # An empty class adds 0 (and a zero gradient), never nan.
    return total / count if count > 0 else total * 0.0


def forgetting_objective(
    token_ce: Tensor,
    token_class: Tensor,
    *,
    mode: str,
    lam: float = 0.0,
    negative_term: str = "ascent",
    normalization: str = "micro_batch",
    global_pos_count: float | None = None,
    global_neg_count: float | None = None,
    class_counts: tuple[int, int] | None = None,
) -> ObjectiveOutput:
    """Objective over per-token CE (any shape) and classes (+1 pos, -1 neg, 0 not trained).

    Global counts are the class +1 / class -1 counts of the whole optimizer step; "sft"
    divides by their sum, "ignore" needs only global_pos_count. See the module docstring.
    `class_counts` = (+1 count, -1 count) of `token_class`, from a caller that counted and
    checked the classes on the host before the batch moved to an accelerator: the objective
    then reads nothing back from the device (counting there waits for the GPU every
    micro-batch). They are trusted, not re-checked.
    """
    _choice("mode", mode, MODES)
    _choice("negative_term", negative_term, NEGATIVE_TERMS)
    _choice("normalization", normalization, NORMALIZATIONS)
    if token_ce.shape != token_class.shape:
        raise ValueError(
            f"token_ce shape {tuple(token_ce.shape)} != token_class shape "
            f"{tuple(token_class.shape)}"
        )
    if not token_ce.dtype.is_floating_point:
        raise ValueError(f"token_ce must be floating point, got {token_ce.dtype}")
    if token_class.dtype.is_floating_point:
        raise ValueError(f"token_class must be an integer tensor, got {token_class.dtype}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite value >= 0, got {lam!r}")

    ce = token_ce.float()
    pos = token_class == 1
    neg = token_class == -1
    if class_counts is not None:
        n_pos, n_neg, n_bad = int(class_counts[0]), int(class_counts[1]), 0
    else:
        bad = ~(pos | neg | (token_class == 0))
        # One host sync for all three counts.
        n_pos, n_neg, n_bad = torch.stack([pos.sum(), neg.sum(), bad.sum()]).tolist()
    if n_bad:
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token_class must be -1, 0 or +1; found {int(token_class[where])} at index {where}"
        )

    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    # torch.where, not multiplication: a nan/inf CE at an untrained position must not leak.
    pos_sum = torch.where(pos, ce, zero).sum()
    neg_sum = torch.where(neg, ce, zero).sum()

    if mode == "sft":
        g_pos = global_pos_count
        g_neg = global_neg_count
        if normalization == "global":
            if g_pos is None or g_neg is None:
                raise ValueError("normalization 'global' with mode 'sft' needs both "
                                 "global_pos_count and global_neg_count")
            # Each validated on its own so an error names the offending count.
            _denominator("global_pos_count", n_pos, g_pos, normalization)
            _denominator("global_neg_count", n_neg, g_neg, normalization)
        denom = (
            float(n_pos + n_neg) if normalization == "micro_batch" else float(g_pos) + float(g_neg)
        )
        loss = _mean(pos_sum + neg_sum, denom)
    else:
        pos_denom = _denominator("global_pos_count", n_pos, global_pos_count, normalization)
        loss = _mean(pos_sum, pos_denom)
        if mode == "forget":
            neg_denom = _denominator("global_neg_count", n_neg, global_neg_count, normalization)
            if negative_term == "ascent":
                loss = loss - lam * _mean(neg_sum, neg_denom)
            else:
                # Evaluate the term on a safe value off the negatives: a nan CE elsewhere would
                # otherwise turn the (masked) zero gradient into 0 * nan = nan.
                safe_ce = torch.where(neg, ce, torch.ones_like(ce))
                ul = torch.where(neg, unlikelihood_term(safe_ce), zero).sum()
                loss = loss + lam * _mean(ul, neg_denom)

    nan = torch.full((), float("nan"), device=ce.device)
    with torch.no_grad():
        pos_loss = pos_sum.detach() / n_pos if n_pos else nan
        neg_loss = neg_sum.detach() / n_neg if n_neg else nan.clone()
    return ObjectiveOutput(loss=loss, pos_loss=pos_loss, neg_loss=neg_loss,
                           n_pos=int(n_pos), n_neg=int(n_neg))
