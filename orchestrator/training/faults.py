"""Test-only fault injection, handed to the recipe by its worker context (`ctx.faults`).

Two hooks, set per job through `TrainJob.test_hooks` (never by a config file):
- `_nan_at_step: k` poisons every micro-batch loss of optimizer step k (1-based), to drive
  `train.on_nonfinite`;
- `_fail_once_at_step: k` makes every rank raise once, right after the checkpoint of step k
  (a marker file in the job's storage folder says it happened, so the restarted worker
  group trains through), to drive resume after a failure.

Without hooks every call is a no-op, so the recipe calls them unconditionally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

FAIL_MARKER = "_injected_failure_done"


@dataclass(frozen=True)
class FaultHooks:
    nan_at_step: int | None = None
    fail_once_at_step: int | None = None
    marker: Path | None = None  # <storage>/<run>/_injected_failure_done

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FaultHooks:
        """From a worker's job config (the driver flattens `test_hooks` into it)."""
        hooks = {**(config.get("test_hooks") or {}), **config}
        return cls(nan_at_step=hooks.get("_nan_at_step"),
                   fail_once_at_step=hooks.get("_fail_once_at_step"),
                   marker=Path(config["storage_path"]) / config["run_name"] / FAIL_MARKER)

    def poison(self, loss: Tensor, step: int) -> Tensor:
        """`loss` times nan during optimizer step `step` + 1 when asked, else `loss`."""
        return loss * float("nan") if self.nan_at_step == step + 1 else loss

    def after_checkpoint(self, step: int, is_rank_0: bool, barrier: Callable[[], None]) -> None:
        """Raise on every rank, once, after the checkpoint of step `step` when asked."""
        if self.fail_once_at_step != step or self.marker is None:
            return
        already = self.marker.exists()
        barrier()  # every rank has looked before rank 0 writes the marker
        if already:
            return
        if is_rank_0:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        raise RuntimeError(f"injected failure after the checkpoint of step {step}")
