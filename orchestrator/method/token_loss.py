"""Per-token cross-entropy from last hidden states, one chunk of logits at a time.

A full `[N, V]` fp32 logits tensor is the largest buffer of an LLM step (8 x 2048 rows x
128k vocab = 8 GiB, twice that with its gradient). `chunked_token_ce` never materialises it:
the forward keeps only the log-sum-exp per row, and the backward recomputes each chunk's
logits to build that chunk's softmax gradient. Peak extra memory is O(chunk_size x V).

Alignment helpers (`shift_targets`, `shift_aligned`, `unshift_losses`) are here too, so the
collate function and the scorer shift labels and per-token columns in exactly one way.

Pure torch: no Ray, MLflow or transformers imports (method core).
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.bfloat16, torch.float16)

# Whether `torch.mm(..., out_dtype=torch.float32)` works, per (device type, dtype). It lets
# bf16/fp16 matmuls write fp32 results straight from the fp32 accumulator (no bf16 rounding
# of the logits); it exists on CUDA but not on CPU in torch 2.13. Support is decided by a
# tiny probe, never by a failure of the real call: an out-of-memory (or any other error) of
# a real chunk must reach the caller, not silently switch the process to the slow path.
_MM_OUT_DTYPE_OK: dict[tuple[str, torch.dtype], bool] = {}


def _mm_out_dtype_supported(a: Tensor) -> bool:
    key = (a.device.type, a.dtype)
    known = _MM_OUT_DTYPE_OK.get(key)
    if known is not None:
        return known
    probe = torch.zeros(1, 1, dtype=a.dtype, device=a.device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
        ok = True
    except torch.OutOfMemoryError:
        raise  # says nothing about support: decide on a later call
    except (RuntimeError, TypeError, NotImplementedError):
        ok = False
    _MM_OUT_DTYPE_OK[key] = ok
    return ok


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as float32. Low-precision inputs keep their fast kernels (fp32 accumulate)."""
    if a.dtype == torch.float32:
        return a @ b
    if _mm_out_dtype_supported(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """Matmul dtype: the shared dtype when hidden and weight agree, else float32."""
    return hidden.dtype if hidden.dtype == weight.dtype else torch.float32


def _chunk_logits(h: Tensor, w: Tensor, bias32: Tensor | None) -> Tensor:
    logits = _matmul_fp32(h, w.t())
    if bias32 is not None:
        logits += bias32
    return logits


class _ChunkedTokenCE(torch.autograd.Function):
    """Saves hidden, weight, bias, targets and lse only; never N x V."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index):  # noqa: D401
        n = hidden.shape[0]
        dt = _compute_dtype(hidden, weight)
        w = weight.to(dt)  # no copy in the common case (same dtype)
        bias32 = None if bias is None else bias.float()
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                logits = _chunk_logits(hidden[start:stop].to(dt), w, bias32)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe_targets[start:stop, None]).squeeze(1)
                del logits
                lse[start:stop] = chunk_lse
                losses[start:stop] = chunk_lse - target_logit
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse)
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, safe_targets, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk_size = ctx.chunk_size
        n = hidden.shape[0]
        dt = _compute_dtype(hidden, weight)
        w = weight.to(dt)
        bias32 = None if bias is None else bias.float()
        # Ignored rows get no gradient at all, whatever the upstream gradient says.
        g = torch.where(valid, grad_losses.float(), torch.zeros_like(lse))

        grad_hidden = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators: summing many bf16 chunk products in bf16 would lose the small ones.
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b32 = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                h = hidden[start:stop].to(dt)
                # d CE / d logits = softmax - onehot, scaled by the row's upstream gradient.
                grad_logits = _chunk_logits(h, w, bias32)
                grad_logits.sub_(lse[start:stop, None]).exp_()
                g_chunk = g[start:stop]
                grad_logits.mul_(g_chunk[:, None])
                grad_logits.scatter_add_(1, safe_targets[start:stop, None], -g_chunk[:, None])
                if grad_b32 is not None:
                    grad_b32 += grad_logits.sum(dim=0)
                gl = grad_logits.to(dt)
                del grad_logits
                if grad_hidden is not None:
                    grad_hidden[start:stop] = (gl @ w).to(hidden.dtype)
                if grad_w32 is not None:
                    grad_w32 += _matmul_fp32(gl.t(), h)
                del gl

        grad_weight = None if grad_w32 is None else grad_w32.to(weight.dtype)
        grad_bias = None if grad_b32 is None else grad_b32.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_token_ce(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    check_targets: bool = True,
) -> Tensor:
    """Cross-entropy per row of `hidden @ weight.T (+ bias)` against `targets`.

    hidden [N, H] (float32 / bfloat16 / float16), weight [V, H] (may be tied to an
    embedding: it is just a tensor), targets [N] integer, bias [V] or None.
    Returns float32 [N]: CE per row, 0.0 (and no gradient) where target == ignore_index.
    Softmax statistics are computed in fp32 per chunk; gradients come back in the input
    dtypes. Peak extra memory ~ chunk_size x V x 4 bytes (a few such buffers), not N x V.
    `check_targets=False` skips the vocabulary range check, which costs a device->host sync;
    only for callers that checked the ids already (an out-of-range id then fails inside
    `gather` with a less helpful message).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"targets must be [N] with N = {hidden.shape[0]}, got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden/weight must be floating point, got {hidden.dtype}/{weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] with V = {weight.shape[0]}, got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    targets = targets.long()
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab)) if check_targets else None
    if bad is not None and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(targets[row])} at row {row} is outside the vocabulary [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )
    return _ChunkedTokenCE.apply(hidden, weight, bias, targets, chunk_size, ignore_index)


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(t.shape)}")


def shift_targets(input_ids: Tensor, target_mask: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token labels: labels[:, t] = input_ids[:, t+1] if target_mask[:, t+1] else ignore.

    The last column has no next token and is always ignore_index. Shapes [B, T] -> [B, T].
    """
    _check_2d("input_ids", input_ids)
    if target_mask.shape != input_ids.shape:
        raise ValueError(
            f"target_mask shape {tuple(target_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.long)
    labels[:, :-1] = torch.where(
        target_mask[:, 1:].bool(), input_ids[:, 1:].long(), torch.full_like(labels[:, :-1], ignore_index)
    )
    return labels


def shift_aligned(values: Tensor, fill) -> Tensor:
    """Shift a per-token column exactly like labels: out[:, t] = values[:, t+1], last = fill."""
    _check_2d("values", values)
    out = torch.full_like(values, fill)
    out[:, :-1] = values[:, 1:]
    return out


def unshift_losses(shifted: Tensor) -> Tensor:
    """Losses at prediction positions -> aligned with input_ids.

    out[:, i] = shifted[:, i-1] (the loss of predicting token i); out[:, 0] = 0 because the
    first token is never a target. The last shifted column (no next token) is dropped.
    """
    _check_2d("shifted", shifted)
    out = torch.zeros_like(shifted)
    out[:, 1:] = shifted[:, :-1]
    return out


# ----------------------------------------------------------------------------- decoder -> CE
# The one loss path of training, scoring and the tests: the decoder runs alone (no
# [B, T, V] logits), only the hidden rows at prediction positions are kept, and
# chunked_token_ce turns them into per-token CE. The paper's token loss is the ordinary
# next-token CE of each response token (Taheri et al., TMLR 2026, arXiv 2508.04329): the
# quantity both the score (method/score.py) and the objective (method/objective.py) are
# built from.


def prediction_rows(labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(flat row indices into [B * T], target ids) of the positions that carry a label.

    Row-major order, the order of `hidden[labels != ignore_index]`. On CUDA tensors this
    syncs with the host (nonzero); a caller that knows the rows on the host builds the
    labels there (CPU tensors) and moves only the result, as the scorer does.
    """
    _check_2d("labels", labels)
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    return rows, flat_labels.index_select(0, rows)


def _last_hidden(outputs) -> Tensor:
    """The decoder's last hidden states [B, T, H] from a tensor, a ModelOutput or a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    hidden = getattr(outputs, "last_hidden_state", None)
    return hidden if hidden is not None else outputs[0]


def decoder_token_ce(
    decoder,
    weight: Tensor,
    bias: Tensor | None,
    input_ids: Tensor,
    rows: Tensor,
    targets: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    check_targets: bool = True,
) -> Tensor:
    """float32 [N]: CE of `targets` predicted from the decoder's hidden states at `rows`.

    `decoder(input_ids=..., use_cache=False)` returns the last hidden states after the final
    norm (`models.decoder_and_head` finds it and the head), so `hidden @ weight.T + bias`
    are the model's logits. `rows` index the flattened [B * T] positions (from
    `prediction_rows`: row t predicts token t + 1). Differentiable (training uses it).
    """
    if weight.numel() == 0:
        raise ValueError(
            "lm_head weight is empty (partitioned by DeepSpeed ZeRO-3?): compute the loss "
            "inside a module forward that registers it as an external parameter"
        )
    kwargs = {"input_ids": input_ids, "use_cache": False}
    # Only what the caller gave: a None passed explicitly is the same as leaving it out for
    # these families, but not for every decoder one might hand in.
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden = _last_hidden(decoder(**kwargs))
    if hidden.dtype != weight.dtype and torch.is_autocast_enabled(hidden.device.type):
        # What autocast does for an nn.Linear head: a low-precision copy of the weight
        # (differentiable), so the largest matmul does not fall back to fp32.
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    del hidden
    return chunked_token_ce(picked, weight, targets, bias=bias, chunk_size=chunk_size,
                            ignore_index=ignore_index, check_targets=check_targets)


def aligned_token_ce(
    decoder,
    weight: Tensor,
    bias: Tensor | None,
    input_ids: Tensor,
    target_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = 4096,
) -> Tensor:
    """float32 [B, T] aligned with input_ids: out[b, i] = CE of token i given tokens < i
    where target_mask[b, i] is set (i >= 1), 0.0 elsewhere (position 0 included).

    With packed sequences (position_ids restarting per sample) the caller clears
    target_mask at each sample's first token, which has no in-sample context.
    """
    _check_2d("input_ids", input_ids)
    labels = shift_targets(input_ids, target_mask)
    rows, targets = prediction_rows(labels)
    losses = decoder_token_ce(decoder, weight, bias, input_ids, rows, targets,
                              attention_mask=attention_mask, position_ids=position_ids,
                              chunk_size=chunk_size)
    # Out-of-place copy keeps the autograd path from each loss back to its hidden row.
    shifted = torch.zeros(labels.numel(), dtype=torch.float32, device=losses.device)
    shifted = shifted.index_copy(0, rows, losses.float()).reshape(labels.shape)
    return unshift_losses(shifted)
