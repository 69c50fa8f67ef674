"""The training strategy: every torch.distributed and DeepSpeed call of the recipe.

The recipe (`trainer.Trainer`) says *what* happens in a step; the strategy says how it
runs on this worker group: which engine holds the model (DeepSpeed ZeRO or plain torch /
DDP, both in `deepspeed_setup`), backward and optimizer step through it, and the few
collectives the bookkeeping needs (sums of a dict or dataclass, "does any rank say yes",
min / max of a count, barriers). The shape follows OpenRLHF's `DeepspeedStrategy`
(backward, optimizer_step, all_reduce of a dict, is_rank_0), written for this loop.

Collectives go through `training.distributed`, which moves host tensors where the backend
wants them (NCCL reduces CUDA tensors only), so the recipe never sees a device or backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from orchestrator.config import TrainConfig
from orchestrator.models import resolve_dtype
from orchestrator.training import distributed
from orchestrator.training.deepspeed_setup import (
    DDPEngine,
    DeepSpeedEngine,
    build_optimizer,
    fill_deepspeed_config,
)
from orchestrator.training.export import gather_state_dict

T = TypeVar("T")


class Strategy:
    """One worker's view of the group: rank, world size, device, and (after `prepare`) the
    engine that runs forward, backward and optimizer steps."""

    def __init__(self, rank: int, world_size: int, device: torch.device, train: TrainConfig,
                 deepspeed_config: dict[str, Any] | None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.train_cfg = train
        self.deepspeed_config = deepspeed_config
        self.compute_dtype = resolve_dtype(train.dtype, str(device))
        self.engine: DeepSpeedEngine | DDPEngine | None = None

    # ------------------------------------------------------------------ set-up

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype to load weights in. DeepSpeed keeps fp32 master weights itself: load in
        the compute dtype. Plain torch keeps fp32 weights and autocasts (pure bf16 weights
        would lose small AdamW updates)."""
        return self.compute_dtype if self.deepspeed_config is not None else torch.float32

    def prepare(self, loss_model: nn.Module, total_updates: int) -> None:
        """Build the optimizer and LR schedule and wrap `loss_model` in the engine."""
        t = self.train_cfg
        opt, sched = build_optimizer(loss_model, t.lr, t.weight_decay, total_updates,
                                     t.warmup_ratio, self.device)
        if self.deepspeed_config is not None:
            ds_cfg = fill_deepspeed_config(self.deepspeed_config, micro=t.micro_batch_size,
                                           gas=t.grad_accum_steps, world=self.world_size,
                                           max_grad_norm=t.max_grad_norm,
                                           dtype=self.compute_dtype)
            self.engine = DeepSpeedEngine(loss_model, ds_cfg, opt, sched)
            return
        autocast = self.compute_dtype if self.compute_dtype != torch.float32 else None
        self.engine = DDPEngine(loss_model, opt, sched, gas=t.grad_accum_steps,
                                max_grad_norm=t.max_grad_norm, device=self.device,
                                autocast_dtype=autocast)

    @property
    def _engine(self) -> DeepSpeedEngine | DDPEngine:
        if self.engine is None:
            raise RuntimeError("Strategy.prepare() has not been called")
        return self.engine

    # ------------------------------------------------------------------ model steps

    def is_rank_0(self) -> bool:
        return self.rank == 0

    def to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(CE per target row, class per target row) of a collated micro-batch."""
        return self._engine.forward(batch)

    def backward(self, loss: Tensor) -> None:
        """Backward of one micro-batch loss (the engine divides it by grad_accum)."""
        self._engine.backward(loss)

    def optimizer_step(self, boundary: bool) -> float | None:
        """After every micro-batch (DeepSpeed's rule); the optimizer steps at the boundary,
        which returns the gradient norm (None otherwise)."""
        return self._engine.micro_step(boundary=boundary)

    def set_train(self, mode: bool) -> None:
        self._engine.train(mode)

    def lr(self) -> float:
        return self._engine.lr()

    def save(self, directory: Path) -> None:
        """Engine state into `directory` (every rank writes its shard: collective)."""
        self._engine.save(directory)

    def load(self, directory: Path) -> None:
        self._engine.load(directory)

    def full_state_dict(self, trainable_only: bool) -> dict[str, Tensor]:
        """The whole model's weights on rank 0 (a collective gather under ZeRO-3)."""
        zero3 = isinstance(self.engine, DeepSpeedEngine) and self.engine.stage == 3
        return gather_state_dict(self._engine.module, zero3, trainable_only=trainable_only)

    def describe(self) -> dict[str, Any]:
        """What metrics.json says about the engine."""
        engine = self._engine
        return {"engine": engine.kind,
                "zero_stage": engine.stage if isinstance(engine, DeepSpeedEngine) else None}

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, sums: T) -> T:
        """Sum a dict or dataclass of numbers over the ranks, in one collective."""
        return distributed.all_reduce_sums(sums)

    def any_rank(self, flag: bool | Tensor) -> bool:
        """True on every rank when it is true on at least one. A tensor flag is reduced on
        its own device and read once (one host sync, not one to read it and one after)."""
        if isinstance(flag, Tensor):
            t = flag.detach().reshape(-1).to(torch.float32).amax(0, keepdim=True)
        else:
            t = torch.tensor([1.0 if flag else 0.0])
        return bool(distributed.all_reduce(t, op=dist.ReduceOp.MAX).item())

    def min_over_ranks(self, n: int) -> int:
        return int(distributed.all_reduce(torch.tensor([n]), op=dist.ReduceOp.MIN))

    def max_over_ranks(self, n: int) -> int:
        return int(distributed.all_reduce(torch.tensor([n], dtype=torch.long),
                                          op=dist.ReduceOp.MAX))

    def barrier(self, long_wait: bool = False) -> None:
        """Wait for every rank; `long_wait` on a gloo group with a long timeout (export)."""
        distributed.barrier(long_wait=long_wait)
