"""One tracking layer: driver and training rank 0 share the target, the param / metric rules,
the run labels and the null run (no MLflow server: a local sqlite store)."""

from __future__ import annotations

import pytest

from orchestrator.tracking import NullRun, RunLabel, TrackingTarget
from orchestrator.tracking.target import PARAM_VALUE_MAX, TRUNCATION_MARKER
from orchestrator.training import MlflowTarget
from orchestrator.training.mlflow_logging import TrainingCurves, training_params

SECRET = "hf_SuperSecretValue_12345"


def test_run_labels_read_back_what_they_write():
    trained, base = RunLabel("tiny", "forget", 3), RunLabel("tiny", "base")
    assert (str(trained), trained.run_name) == ("tiny/forget/s3", "tiny/forget/s3")
    assert (str(base), base.run_name) == ("tiny/base/-", "tiny/base")
    assert RunLabel.parse("tiny/forget/s3") == trained and RunLabel.parse("tiny/base/-") == base


def test_the_training_target_is_the_tracking_target():
    assert MlflowTarget is TrackingTarget
    target = MlflowTarget(tracking_uri="sqlite:///x.db", experiment="e", parent_run_id="p",
                          run_name=None, tags={"method": "sft"})
    assert TrackingTarget.coerce(target.to_dict()) == target and target.run_id is None


def test_no_target_and_other_ranks_log_into_a_null_run(tmp_path):
    target = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"}
    for curves in (TrainingCurves(None, rank=0, run_name="r", params={}),
                   TrainingCurves(target, rank=1, run_name="r", params={})):
        assert isinstance(curves.run, NullRun) and curves.run_id is None
        curves.log({"loss": 1.0}, 1)
        assert curves.finish() is True
    assert not (tmp_path / "mlflow.db").exists()


def test_rank0_params_and_metrics_follow_the_driver_rules(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HF_TOKEN", SECRET)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train = {"lr": 1e-4, "methods": ["sft", "forget"], "data_path": f"/d/{SECRET}",
             "note": "x" * 2000, "lambda": {"t_max": 0.25}}
    target = TrackingTarget(tracking_uri=uri, experiment="e", run_name="tiny-forget",
                            spool_dir=str(tmp_path / "spool"))
    curves = TrainingCurves(target, rank=0, run_name="job", params=training_params("forget", train))
    assert curves.run_id is not None
    curves.log({"loss": 0.5, "bad": float("nan"), "with space?": 2.0}, 1)
    assert curves.finish() is True
    run = MlflowClient(uri).get_run(curves.run_id)
    params = run.data.params
    assert params["method"] == "forget" and params["train.lambda.t_max"] == "0.25"
    assert params["train.methods"] == '["sft", "forget"]'  # flatten_config, as the driver
    assert params["train.data_path"] == "/d/***"  # secrets from the environment masked
    assert len(params["train.note"]) == PARAM_VALUE_MAX
    assert params["train.note"].endswith(TRUNCATION_MARKER)
    assert run.data.metrics == {"loss": 0.5, "with space_": 2.0}  # finite, MLflow-safe keys
    assert run.data.tags["lethe.stage"] == "train" and run.info.run_name == "tiny-forget"


@pytest.mark.parametrize("method", ["base", "partition"])
def test_seedless_runs_are_named_without_a_seed(method):
    assert RunLabel("m", method).run_name == f"m/{method}"
