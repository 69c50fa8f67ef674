"""`lethe tune` on cluster configs (orchestrator/tune/resources.py): a sweep ranked by the
validation loss is refused at once when the config holds out no validation data, naming
train.validation_size; a trial that evaluates on a GPU reserves it (a Tune placement-group
factory with a bundle for the evaluation) and evaluates in a Ray task placed in that bundle,
on the device Ray assigned there. The shipped paper and tune-demo configs are used as
shipped, overrides listed in each test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper" / "llama3.2-1b.yaml"
DEMO = REPO / "configs" / "tune-demo.yaml"


def test_tune_refuses_a_config_without_validation_data_at_once(tmp_path, capsys, monkeypatch):
    """The paper config (train.validation_size: 0, a hub source): `lethe tune` exits 2 with
    one line naming the field, before any stage, store or Ray instance exists."""
    from orchestrator.cli import main
    from orchestrator.pipeline import run

    monkeypatch.setattr(run, "init_ray", lambda cfg: pytest.fail("Ray was started"))
    rc = main(["tune", str(PAPER), f"run_dir={tmp_path}"])  # override: run_dir
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.validation_size" in err and "tune.metric=val_loss" in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_validation_rule():
    from orchestrator.tune.resources import require_validation

    with pytest.raises(ConfigError, match=r"Set train.validation_size"):
        require_validation(load_config(PAPER))
    require_validation(load_config(PAPER, ["train.validation_size=500"]))
    # an evaluation metric needs no validation split
    require_validation(load_config(PAPER, ["tune.metric=eval/boolq/acc", "tune.mode=max"]))
    require_validation(load_config(DEMO))  # the synthetic corpus has its clean held-out rows


def test_trials_reserve_the_evaluations_gpu():
    from ray import tune

    from orchestrator.tune.resources import trial_bundles, trial_resources

    paper = load_config(PAPER, ["train.validation_size=500"])
    assert paper.evaluate.num_gpus == 1 and paper.tune.gpus_per_trial == 0
    assert trial_bundles(paper) == [{"CPU": 0.01}, {"CPU": 4.0, "GPU": 1.0}]
    factory = trial_resources(paper)
    assert isinstance(factory, tune.PlacementGroupFactory)
    assert factory.bundles == [{"CPU": 0.01}, {"CPU": 4.0, "GPU": 1.0}]
    assert factory.required_resources == {"CPU": 4.01, "GPU": 1.0}
    driver_gpu = load_config(PAPER, ["train.validation_size=500", "tune.gpus_per_trial=1"])
    assert trial_bundles(driver_gpu)[0] == {"CPU": 0.01, "GPU": 1.0}
    # evaluation on CPU (tune-demo) or none: the driver's bundle only
    assert trial_bundles(load_config(DEMO)) == [{"CPU": 0.01}]
    assert trial_bundles(load_config(PAPER, ["evaluate.enabled=false"])) == [{"CPU": 0.01}]


def test_gpu_evaluation_goes_to_the_bundle_cpu_evaluation_stays(monkeypatch):
    from orchestrator.pipeline import evaluate_stage
    from orchestrator.tune import resources

    calls = []
    monkeypatch.setattr(resources, "run_in_eval_bundle",
                        lambda fn, *args, num_cpus, num_gpus: calls.append((num_cpus, num_gpus))
                        or ({"m": {}}, {"m": "/x"}))
    gpu = load_config(PAPER, ["train.validation_size=500"])
    results, dirs = resources.evaluate_in_trial(gpu, {"m": "/model"}, None)
    assert calls == [(4.0, 1.0)] and dirs == {"m": Path("/x")}
    seen = []
    monkeypatch.setattr(evaluate_stage, "evaluate_labelled",
                        lambda cfg, wanted, syn, in_process: seen.append(in_process)
                        or ({"m": {"t": {"acc": 1.0}}}, {"m": Path("/y")}))
    results, dirs = resources.evaluate_in_trial(load_config(DEMO), {"m": "/model"}, None)
    assert seen == [True] and calls == [(4.0, 1.0)] and results == {"m": {"t": {"acc": 1.0}}}


@pytest.mark.ray
def test_a_trial_runs_its_evaluation_in_its_reserved_bundle(ray_local, tmp_path):
    """A real Tune trial with a two-bundle placement group (CPU stands in for the GPU the
    machine lacks): the evaluation task holds the second bundle's share, in the trial's
    own placement group, and picks "cpu" because Ray assigned it no GPU."""
    from ray import tune

    # Defined here so that Ray pickles them by value (workers cannot import this module).
    def _probe() -> dict:
        import ray

        from orchestrator.tune.resources import assigned_device

        ctx = ray.get_runtime_context()
        return {"resources": ctx.get_assigned_resources(), "group": ctx.get_placement_group_id(),
                "device": assigned_device()}

    def _trial(config: dict) -> None:
        import ray
        from ray import tune
        from ray.util import get_current_placement_group

        from orchestrator.tune.resources import run_in_eval_bundle

        seen = run_in_eval_bundle(_probe, num_cpus=0.5, num_gpus=0)
        own = ray.get_runtime_context().get_assigned_resources()
        tune.report({"eval_cpu": seen["resources"].get("CPU", 0.0), "device": seen["device"],
                     "same_group": float(seen["group"] == get_current_placement_group().id.hex()),
                     "driver_cpu": own.get("CPU", 0.0)})

    trainable = tune.with_resources(_trial, tune.PlacementGroupFactory(
        [{"CPU": 0.01}, {"CPU": 0.5}], strategy="PACK"))
    grid = tune.Tuner(trainable, run_config=tune.RunConfig(
        storage_path=str(tmp_path), name="bundle", verbose=0)).fit()
    [result] = list(grid)
    assert result.error is None, result.error
    m = result.metrics
    assert m["eval_cpu"] == 0.5 and m["same_group"] == 1.0 and m["device"] == "cpu"
    assert m["driver_cpu"] == 0.01


def test_outside_a_trial_there_is_no_bundle_to_run_in(ray_local):
    from orchestrator.tune.resources import assigned_device, run_in_eval_bundle

    with pytest.raises(RuntimeError, match="no placement group with an evaluation bundle"):
        run_in_eval_bundle(assigned_device, num_cpus=0.1, num_gpus=0)
