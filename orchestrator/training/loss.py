"""The training loss around the method core: target-row CE inside a module's forward.

`TokenLossModel` wraps the causal LM so that the whole loss computation (the method core's
`decoder_token_ce`: decoder -> hidden rows at targets -> chunked CE against the lm_head
weight) happens inside one `forward`.
That matters for the engines: DDP must see the forward through its wrapper, and ZeRO-3
only gathers a partitioned parameter inside the forward of a module that owns it or has
it registered as external (the lm_head weight is read directly, never through
`lm_head.forward`, so it is registered on this wrapper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from orchestrator.method.objective import ObjectiveOutput, forgetting_objective
from orchestrator.method.token_loss import decoder_token_ce, prediction_rows
from orchestrator.models.losses import decoder_and_head
from orchestrator.training.collate import IGNORE_INDEX


class TokenLossModel(nn.Module):
    """forward(input_ids, attention_mask, rows, targets, row_class) -> (ce_rows, class_rows).

    Only rows with a target reach the head, so logits exist for a chunk of target rows at a
    time, never for padding or prompt tokens. Which rows those are is worked out on the host
    (`target_rows`) before the batch moves: picking them on the device (`nonzero`) and
    range-checking the targets there would each wait for the GPU before the decoder's
    kernels could even be queued, on every micro-batch. The older signature
    (input_ids, attention_mask, labels, target_class) still works (it picks on the device).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 4096) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # Read before an engine wraps the model: ZeRO-3 leaves an empty stub in its place.
        weight = decoder_and_head(model)[1]
        self.vocab_size = int(getattr(weight, "ds_shape", weight.shape)[0])

    def head_weight(self) -> nn.Parameter:
        return decoder_and_head(self.model)[1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                target_class: Tensor | None = None, *, rows: Tensor | None = None,
                targets: Tensor | None = None,
                row_class: Tensor | None = None) -> tuple[Tensor, Tensor]:
        decoder, weight, bias = decoder_and_head(self.model)
        checked = rows is not None  # target_rows checked the ids against the vocabulary
        if rows is None:
            if labels is None or target_class is None:
                raise ValueError("TokenLossModel needs rows/targets/row_class or labels/target_class")
            rows, targets = prediction_rows(labels, IGNORE_INDEX)
            row_class = target_class.reshape(-1).index_select(0, rows)
        assert targets is not None and row_class is not None
        ce = decoder_token_ce(decoder, weight, bias, input_ids, rows, targets,
                              attention_mask=attention_mask, chunk_size=self.chunk_size,
                              ignore_index=IGNORE_INDEX, check_targets=not checked)
        return ce, row_class


def target_rows(batch: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """A collated micro-batch (host tensors) as `TokenLossModel` takes it: input_ids,
    attention_mask and, for the positions that carry a target, their flat row indices, target
    ids and classes. The ids are checked against the vocabulary here, on the host."""
    rows, targets = prediction_rows(batch["labels"], IGNORE_INDEX)
    bad = (targets < 0) | (targets >= vocab_size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        row, col = divmod(int(rows[i]), batch["labels"].shape[1])
        raise ValueError(f"training batch: target id {int(targets[i])} at row {row}, position "
                         f"{col} is outside the model's vocabulary [0, {vocab_size})")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "rows": rows, "targets": targets,
            "row_class": batch["target_class"].reshape(-1).index_select(0, rows)}


@dataclass
class Normalizer:
    """How a micro-batch loss is normalised inside one optimizer step.

    "global": the objective divides by the step's global class counts (all micro-batches,
    all ranks) and the loss is multiplied by world * gas, because DeepSpeed divides each
    micro-batch loss by gas and gradient all-reduce averages over ranks; the product is
    then exactly the global-token-mean gradient. "micro_batch": the paper's per-micro-batch
    means, averaged by the engine over micro-batches and ranks (scale 1).
    """

    normalization: str
    world_size: int
    grad_accum: int
    global_pos: float | None = None
    global_neg: float | None = None

    @property
    def scale(self) -> float:
        return float(self.world_size * self.grad_accum) if self.normalization == "global" else 1.0


def step_counts(batches: list[dict[str, Tensor]]) -> Tensor:
    """[n_pos, n_neg] over this rank's micro-batches of one optimizer step (float64)."""
    tc = torch.stack([torch.stack([(b["target_class"] == 1).sum(), (b["target_class"] == -1).sum()])
                      for b in batches]).sum(0)
    return tc.to(torch.float64)


def row_class_counts(row_class: Tensor) -> tuple[int, int]:
    """(+1 count, -1 count) of a micro-batch's target-row classes, counted and checked on
    the host (`target_rows` output, before it moves), so the objective needs no device read."""
    bad = (row_class != 1) & (row_class != -1) & (row_class != 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"training batch: target_class must be -1, 0 or +1; found "
                         f"{int(row_class[i])} at target row {i}")
    return int((row_class == 1).sum()), int((row_class == -1).sum())


def objective_for_batch(ce: Tensor, cls: Tensor, *, mode: str, lam: float, negative_term: str,
                        norm: Normalizer, class_counts: tuple[int, int] | None = None,
                        ) -> ObjectiveOutput:
    """The method core's objective on the target rows, scaled for the engine's averaging.
    `class_counts`: `row_class_counts` of the host batch (no device read for them)."""
    out = forgetting_objective(
        ce, cls, mode=mode, lam=lam, negative_term=negative_term,
        normalization=norm.normalization,
        global_pos_count=norm.global_pos if norm.normalization == "global" else None,
        global_neg_count=norm.global_neg if norm.normalization == "global" else None,
        class_counts=class_counts,
    )
    out.loss = out.loss * norm.scale
    return out
