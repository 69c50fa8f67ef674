"""What TorchTrainer is given as `train_loop_per_worker`: a stub that imports the loop
only when it runs.

Why: Ray pickles the function by reference, so every process that unpickles the trainer
(the Ray Train controller as well as the workers) imports the function's module. The
controller never trains; importing the loop there cost it torch, transformers and
DeepSpeed (about 6 s of CPU per run, paid by every family's run at once on a small machine).
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.embedded import EMBEDDED_ENV  # set by the pipeline's own local instance


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
    behaviour. On the pipeline's embedded instance the placement-group cleaner goes too.
    `_create_default_callbacks` is private (Ray is pinned to 2.60): a Ray that renames it
    gets the stock trainer, and tests/test_ray_entry.py fails on a changed callback list.
    """
    from ray.train.torch import TorchTrainer

    drop = set() if kwargs.get("datasets") else {"DatasetsCallback"}
    if os.environ.get(EMBEDDED_ENV) == "1":
        # The placement-group cleaner is one more actor per run; it asks the state API (the
        # dashboard) twice a second whether the controller died, to free the workers'
        # placement group if it did. On the embedded instance the controller only dies with
        # the driver, and Ray with it; without a dashboard it only logs failed queries.
        drop.add("PlacementGroupCleanerCallback")

    class _LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [cb for cb in super()._create_default_callbacks()
                    if type(cb).__name__ not in drop]

    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer(*args, **kwargs)
    return _LeanTorchTrainer(*args, **kwargs)
