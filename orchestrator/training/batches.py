"""Where the recipe's micro-batches come from: the step's stream, validation rows, and the
stand-in batch of a skipped step. Plain numpy / torch, no collectives."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from orchestrator.training.collate import IGNORE_INDEX, collate
from orchestrator.training.data import StepPlan, TokenRows, read_table, rows_from_table


class MicroBatchStream:
    """The micro-batches of optimizer step s: stream items [s*gas, (s+1)*gas) of the plan.

    A step's position follows from s alone, so a resumed run skips exactly the consumed
    micro-batches of its epoch. Each epoch's order is computed once, not per step.
    """

    def __init__(self, rows: TokenRows, plan: StepPlan, seed: int, pad_id: int) -> None:
        self.rows, self.plan, self.seed, self.pad_id = rows, plan, seed, pad_id
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.plan.epoch_order(epoch, self.seed)
        return self._order

    def step_rows(self, step: int) -> list[np.ndarray]:
        """Row indices (into this rank's shard) of each micro-batch of optimizer step `step`."""
        gas = self.plan.grad_accum
        out = []
        for k in range(step * gas, (step + 1) * gas):
            epoch, position = self.plan.locate(k)
            out.append(self.plan.micro_batch_rows(self._order_of(epoch), position))
        return out

    def sample_ids(self, step: int) -> list[list[int]]:
        """The sample_ids step `step` trains on, per micro-batch (what a resume must repeat)."""
        return [self.rows.sample_ids[idx].tolist() for idx in self.step_rows(step)]

    def for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for idx in self.step_rows(step):
            pairs = [self.rows.row(i) for i in idx]
            out.append(collate([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id))
        return out


def validation_batches(rows: TokenRows, micro: int, n_batches: int,
                       pad_id: int) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """`n_batches` (batch, counts) pairs over `rows`. Every rank runs the same number of
    forwards (ZeRO-3 forwards are collective): past its own rows a rank repeats its first
    batch, marked as not counting."""
    for b in range(n_batches):
        idx = np.arange(b * micro, min((b + 1) * micro, len(rows)))
        real = len(idx) > 0
        idx = idx if real else np.arange(min(micro, len(rows)))
        pairs = [rows.row(i) for i in idx]
        yield collate([p[0] for p in pairs], [p[1] for p in pairs], pad_id), real


def load_validation(path: str | None, rank: int, world: int) -> TokenRows | None:
    """This rank's rank-strided share of the clean held-out rows (all response tokens)."""
    if not path:
        return None
    rows = rows_from_table(read_table(path, ["sample_id", "input_ids", "response_mask"]),
                           "response_mask")
    return rows.take(np.arange(rank, len(rows), world))


def dummy_batch() -> dict[str, torch.Tensor]:
    """One target token: a finite zero-weight backward that keeps every rank in lockstep
    when a step's loss was not finite and the micro-batch is skipped."""
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long),
            "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "labels": torch.tensor([[0, IGNORE_INDEX]]),
            "target_class": torch.tensor([[1, 0]], dtype=torch.int8)}
