"""What TorchTrainer is given as `train_loop_per_worker`: a stub that imports the loop
only when it runs.

Why: Ray pickles the function by reference, so every process that unpickles the trainer
(the Ray Train controller as well as the workers) imports the function's module. The
controller never trains; importing the loop there cost it torch, transformers and
DeepSpeed (about 6 s of CPU per run, paid by every family's run at once on a small machine).
"""

from __future__ import annotations

from typing import Any


def train_loop_entry(config: dict[str, Any]) -> dict[str, Any]:
    """Run `training.loop.train_loop_per_worker(config)` on this worker."""
    from orchestrator.training.loop import train_loop_per_worker

    return train_loop_per_worker(config)


def lean_torch_trainer(*args: Any, **kwargs: Any) -> Any:
    """A TorchTrainer that leaves out Ray Train's dataset callback when the run has no Ray
    datasets (Lethe's workers read Parquet themselves).

    Why: Ray Train 2.60 starts a `DatasetManager` actor for every run, datasets or not; it
    imports Ray Data (about 3 s of CPU) and is one more process per run. On a small machine
    where three families start their runs at once that is measurable on the critical path.
    The callback is only dropped when `datasets` is empty, so a run given datasets keeps Ray's
    behaviour; `_create_default_callbacks` is private, so a Ray upgrade that renames it
    falls back to the stock trainer (tests/test_training_support.py checks both).
    """
    from ray.train.torch import TorchTrainer

    class _LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [cb for cb in callbacks if type(cb).__name__ != "DatasetsCallback"]

    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer(*args, **kwargs)
    return _LeanTorchTrainer(*args, **kwargs)
