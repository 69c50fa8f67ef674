"""What Lethe hands Ray Train (orchestrator/training/ray_entry.py and feed.py): light to
import, and a trainer without Ray Train's dataset actor when there are no datasets."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["orchestrator.training.feed", "orchestrator.training.ray_entry",
                                    "orchestrator.training"])
def test_modules_ray_imports_in_side_processes_do_not_pull_in_torch(module):
    """The job-feed actor and the Ray Train controller import these: each heavy import was
    seconds of CPU per training run."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_private_ray_method_ray_entry_overrides_is_still_there():
    """training/ray_entry.py overrides TorchTrainer._create_default_callbacks (private, Ray
    2.60) to drop two callbacks by class name. A Ray upgrade that renames the method, gives
    it parameters, or renames / drops those callbacks must fail here, loudly, rather than
    quietly give every run the stock trainer (or drop nothing)."""
    import inspect

    import ray
    from ray.train.torch import TorchTrainer

    where = "orchestrator/training/ray_entry.py overrides it: check that override"
    method = getattr(TorchTrainer, "_create_default_callbacks", None)
    assert method is not None, f"Ray {ray.__version__}: TorchTrainer._create_default_callbacks is gone; {where}"
    assert list(inspect.signature(method).parameters) == ["self"], \
        f"Ray {ray.__version__}: _create_default_callbacks{inspect.signature(method)}; {where}"
    source = inspect.getsource(method)
    for name in ("DatasetsCallback", "PlacementGroupCleanerCallback", "BackendSetupCallback"):
        assert f"{name}(" in source, f"Ray {ray.__version__} no longer creates {name} there; {where}"


def test_lean_trainer_drops_the_dataset_callback_only_without_datasets(ray_local, tmp_path,
                                                                       monkeypatch):
    import ray.data
    from ray.train import RunConfig, ScalingConfig

    from orchestrator.training.ray_entry import EMBEDDED_ENV, lean_torch_trainer, train_loop_entry

    monkeypatch.delenv(EMBEDDED_ENV, raising=False)
    kw = {"scaling_config": ScalingConfig(num_workers=1),
          "run_config": RunConfig(name="lean", storage_path=str(tmp_path))}
    names = [type(cb).__name__ for cb in lean_torch_trainer(train_loop_entry, **kw)
             ._create_default_callbacks()]
    assert "DatasetsCallback" not in names and "BackendSetupCallback" in names
    assert "PlacementGroupCleanerCallback" in names  # kept outside the embedded instance
    with_data = lean_torch_trainer(train_loop_entry, datasets={"train": ray.data.range(2)}, **kw)
    assert "DatasetsCallback" in [type(cb).__name__ for cb in with_data._create_default_callbacks()]
    monkeypatch.setenv(EMBEDDED_ENV, "1")
    embedded = [type(cb).__name__ for cb in lean_torch_trainer(train_loop_entry, **kw)
                ._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" not in embedded and "BackendSetupCallback" in embedded


def test_package_names_still_resolve_lazily():
    import orchestrator.training as training

    assert training.run_training.__name__ == "run_training"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        training.nope  # noqa: B018
