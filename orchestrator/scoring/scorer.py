"""TokenScorer: per-token cross-entropy of a base and a reference model over ragged batches.

Plain torch (no Ray): the Ray Data actor in `stage.py` wraps it, and a GPU box without Ray,
a profiler or a benchmark can call it directly (`TokenScorer.from_models`).

What makes it fast (figures: docs/GPU.md, "GPU anchors"):
- Length bucketing: rows are sorted by length and grouped into micro-batches whose padded
  size (rows x longest) stays within `token_budget` (`plan_micro_batches`), so padding
  waste is 4.4 % instead of the 57 % of batches of 6 in data order (docs/GPU.md).
- Right padding and no attention mask: with causal attention a real token never attends to
  the pads that follow it, so the mask is unnecessary and sdpa keeps its fused causal kernel
  (an explicit padding mask would push it onto a slower masked kernel).
- Cross-entropy only on response rows, through the method core's one loss path
  (`decoder_token_ce`, the same as training's): the hidden states at prediction positions
  of response tokens are gathered first and fed to the chunked CE, so full-vocabulary
  logits never exist for the whole batch (only chunk_size x V at a time).

Packing (`packing=True`) is not implemented: it pays only with a varlen attention kernel
(flash-attn), and with sdpa the block-diagonal mask is slower than bucketing (79.4 k vs
128.6 k tokens/s on one H100, docs/GPU.md). The config refuses `scoring.packing: true`; a
direct caller passing packing=True gets a warning and padded buckets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchestrator.method.token_loss import decoder_token_ce, prediction_rows, shift_targets
from orchestrator.models import decoder_and_head, load_model, resolve_dtype

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # shift_targets' default: the label of a position with no target
REQUIRED_KEYS = ("sample_id", "input_ids", "response_mask")


@dataclass
class ScoringCounters:
    """Token counts since construction (for the padding-waste report)."""

    rows: int = 0
    real_tokens: int = 0  # sum of sequence lengths fed to the models
    computed_tokens: int = 0  # rows x padded width, summed over micro-batches
    scored_tokens: int = 0  # response positions with a loss
    micro_batches: int = 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


def plan_micro_batches(lengths: np.ndarray, token_budget: int,
                       overhead_tokens: int | None = None) -> list[np.ndarray]:
    """Row indices per micro-batch, each with padded size rows x longest <= token_budget.

    Rows are sorted longest first and cut into contiguous groups that minimise
    `padded tokens + overhead_tokens x number of forward passes` (dynamic programming over the
    sorted lengths, O(rows x rows-per-group)). Filling every group to the budget greedily
    wastes ~13 % on 256 log-normal rows; the cut costs ~10 % with ~10 % more passes, and
    far less on small calls. `overhead_tokens` (default budget / 8) prices a forward's
    fixed cost, so the plan does not degenerate into one pass per row. A single row longer
    than the budget forms its own micro-batch. Deterministic (ties keep input order).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    overhead = token_budget // 8 if overhead_tokens is None else overhead_tokens
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = np.maximum(lengths[order], 1)
    n = len(order)
    best = np.zeros(n + 1, dtype=np.float64)  # best[i]: cost of rows i.. (sorted)
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[i]: end of the group that starts at i
    for i in range(n - 1, -1, -1):
        rows = max(1, token_budget // int(sorted_len[i]))
        ends = np.arange(i + 1, min(n, i + rows) + 1)
        cost = (ends - i) * sorted_len[i] + overhead + best[ends]
        k = int(np.argmin(cost))
        best[i], cut[i] = cost[k], ends[k]
    groups, i = [], 0
    while i < n:
        groups.append(order[i : cut[i]])
        i = int(cut[i])
    return groups


def _as_row_arrays(column: np.ndarray, name: str) -> list[np.ndarray]:
    """Ragged object array (or a 2-D array when all rows have equal length) -> list of rows."""
    if isinstance(column, np.ndarray) and column.dtype != object and column.ndim == 2:
        return list(column)
    try:
        return [np.asarray(row) for row in column]
    except TypeError as exc:
        raise ValueError(f"batch column '{name}' is not a sequence of arrays") from exc


class TokenScorer:
    """Scores ragged batches with a base and a reference model (both frozen, eval mode)."""

    def __init__(
        self,
        base_path: str,
        ref_path: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        token_budget: int = 16384,
        chunk_size: int = 4096,
        packing: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        base_revision: str | None = None,
    ) -> None:
        # None = whatever is there. A caller whose config asks for GPUs passes "cuda", and
        # load_model then fails clearly when none is visible instead of scoring on CPU.
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = resolve_dtype(dtype, device)
        kw = {"dtype": torch_dtype, "device": device, "trust_remote_code": trust_remote_code,
              "attn_implementation": attn_implementation}
        base = load_model(base_path, revision=base_revision, **kw)  # a hub id's pinned commit
        ref = load_model(ref_path, **kw)
        self._setup(base, ref, token_budget=token_budget, chunk_size=chunk_size, packing=packing)

    @classmethod
    def from_models(
        cls,
        base: nn.Module,
        ref: nn.Module,
        *,
        token_budget: int = 16384,
        chunk_size: int = 4096,
        packing: bool = False,
    ) -> TokenScorer:
        """A scorer around already-built models (same device), e.g. for benchmarks."""
        scorer = cls.__new__(cls)
        scorer._setup(base, ref, token_budget=token_budget, chunk_size=chunk_size, packing=packing)
        return scorer

    def _setup(self, base: nn.Module, ref: nn.Module, *, token_budget: int, chunk_size: int,
               packing: bool) -> None:
        if token_budget < 1 or chunk_size < 1:
            raise ValueError(f"token_budget and chunk_size must be >= 1, got {token_budget}, {chunk_size}")
        if packing:
            log.warning("scoring.packing=True is not supported (needs a varlen attention kernel); "
                        "using length-bucketed padded micro-batches instead")
        self.models = {"base": base.eval(), "ref": ref.eval()}
        self.heads = {name: decoder_and_head(m) for name, m in self.models.items()}
        self.device = next(base.parameters()).device
        if next(ref.parameters()).device != self.device:
            raise ValueError("base and reference models must be on the same device")
        vocab = {name: int(head[1].shape[0]) for name, head in self.heads.items()}
        self.vocab_size = min(vocab.values())
        self.token_budget = int(token_budget)
        self.chunk_size = int(chunk_size)
        self.counters = ScoringCounters()

    # ------------------------------------------------------------------ scoring

    def _validate(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, list, list]:
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"scoring batch is missing column(s) {missing}; has {sorted(batch)}")
        sample_ids = np.asarray(batch["sample_id"], dtype=np.int64)
        ids = _as_row_arrays(batch["input_ids"], "input_ids")
        masks = _as_row_arrays(batch["response_mask"], "response_mask")
        if not len(sample_ids) == len(ids) == len(masks):
            raise ValueError(f"scoring batch columns differ in length: sample_id {len(sample_ids)}, "
                             f"input_ids {len(ids)}, response_mask {len(masks)}")
        for sid, row, mask in zip(sample_ids, ids, masks, strict=True):
            if len(row) != len(mask):
                raise ValueError(f"sample_id {sid}: input_ids has {len(row)} tokens but "
                                 f"response_mask has {len(mask)}")
            if len(row) and (row.min() < 0 or row.max() >= self.vocab_size):
                raise ValueError(f"sample_id {sid}: token id outside the vocabulary "
                                 f"[0, {self.vocab_size}) (min {row.min()}, max {row.max()})")
        return sample_ids, ids, masks

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-token losses of both models, aligned with input_ids, NaN off response tokens.

        Output keys: sample_id (int64), base_loss and ref_loss (object arrays of float32
        arrays), padded_length (int32: the padded width of the row's micro-batch, so that a
        caller without access to this object can sum computed tokens).
        """
        sample_ids, ids, masks = self._validate(batch)
        lengths = np.array([len(r) for r in ids], dtype=np.int64)
        losses = {name: [np.full(n, np.nan, dtype=np.float32) for n in lengths] for name in self.models}
        padded_length = np.zeros(len(ids), dtype=np.int32)
        pending: list[tuple[list, dict[str, torch.Tensor]]] = []
        for rows in plan_micro_batches(lengths, self.token_budget):
            width = int(lengths[rows].max()) if len(rows) else 0
            padded_length[rows] = width
            self.counters.micro_batches += 1
            self.counters.computed_tokens += len(rows) * width
            self.counters.real_tokens += int(lengths[rows].sum())
            if width < 2:
                continue  # no position can be a target
            scored = self._score_micro_batch(rows, width, ids, masks)
            if scored is not None:
                pending.append(scored)
        self._copy_back(pending, losses)
        self.counters.rows += len(ids)
        return {
            "sample_id": sample_ids,
            "base_loss": _object_array(losses["base"]),
            "ref_loss": _object_array(losses["ref"]),
            "padded_length": padded_length,
        }

    def _score_micro_batch(self, rows: np.ndarray, width: int, ids: list, masks: list,
                           ) -> tuple[list, dict[str, torch.Tensor]] | None:
        """Queue both models on one micro-batch; returns (owners, per-model CE on device)."""
        padded = np.zeros((len(rows), width), dtype=np.int64)  # pad value is never attended to
        response = np.zeros((len(rows), width), dtype=np.int8)  # pads are never targets
        for b, r in enumerate(rows):
            padded[b, : len(ids[r])] = ids[r]
            response[b, : len(ids[r])] = masks[r]
        # The labels are built on the host (CPU tensors) with the method core's shift, so
        # picking the target rows costs no device sync; only the result moves.
        input_cpu = torch.from_numpy(padded)
        labels = shift_targets(input_cpu, torch.from_numpy(response))
        flat, targets = prediction_rows(labels)
        if flat.numel() == 0:
            return None
        # Row t of sample b predicts token t + 1: the losses land at positions t + 1.
        predicting = labels.numpy() != IGNORE_INDEX
        owners = [(r, np.flatnonzero(predicting[b]) + 1) for b, r in enumerate(rows)]
        self.counters.scored_tokens += int(flat.numel())
        input_ids = input_cpu.to(self.device, non_blocking=True)
        flat_t, targets_t = flat.to(self.device), targets.to(self.device)
        per_model = {}
        for name, (decoder, weight, bias) in self.heads.items():
            # Targets were range-checked on the host in _validate: skip the device check
            # (a host sync per call).
            per_model[name] = decoder_token_ce(decoder, weight, bias, input_ids, flat_t,
                                               targets_t, chunk_size=self.chunk_size,
                                               check_targets=False)
        return owners, per_model

    def _copy_back(self, pending: list[tuple[list, dict[str, torch.Tensor]]],
                   losses: dict[str, list[np.ndarray]]) -> None:
        """One device->host copy per model for the whole call, after every micro-batch was
        queued: a copy waits for the GPU, and one per micro-batch would idle it each time."""
        if not pending:
            return
        for name in self.models:
            ce = torch.cat([per_model[name] for _, per_model in pending]).cpu().numpy()
            start = 0
            for owners, _ in pending:
                for r, pos in owners:
                    losses[name][r][pos] = ce[start : start + len(pos)]
                    start += len(pos)


def _object_array(rows: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = row
    return out
