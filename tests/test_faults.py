"""Fault drills: each failure mode is provoked for real and the next step is checked.

Every process or mount a test starts is stopped by that test (by PID / mount point).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.config import ConfigError, config_from_dict
from orchestrator.data.errors import DataError
from orchestrator.masking import mask_obj, mask_secrets

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "faults", "models": [{"name": "m", "family": "llama",
                                         "from_config": {"hidden_size": 8}}]}


def _config_file(tmp_path: Path, **updates) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **updates}))
    return path


# ----------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("exc, expected", [
    (DataError("rows.jsonl: row 3, key 'messages': not a list"), "rows.jsonl: row 3"),
    (OSError(errno.ENOSPC, "No space left on device (writing /runs/x/tokens.parquet)"),
     "No space left on device (writing /runs/x/tokens.parquet); free space"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/locked"),
     "Permission denied: /runs/locked"),
])
def test_cli_turns_lethe_errors_into_one_line(tmp_path, monkeypatch, capsys, exc, expected):
    import orchestrator.pipeline.run as run_mod

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(run_mod, "run_pipeline", boom)
    rc = cli.main(["run", str(_config_file(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("lethe: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(type(exc)):  # --debug keeps the traceback (the exception propagates)
        cli.main(["run", str(_config_file(tmp_path)), "--debug"])
    with pytest.raises(type(exc)):
        cli.main(["--debug", "run", str(_config_file(tmp_path))])


def test_cli_unwraps_ray_task_errors_and_keeps_bugs_loud(tmp_path, monkeypatch, capsys):
    import orchestrator.pipeline.run as run_mod

    class FakeRayTaskError(DataError):  # what Ray raises: a subclass of the cause, with .cause
        def __init__(self, cause):
            super().__init__(f"ray::task() (pid=1)\nTraceback (most recent call last):\n{cause}")
            self.cause = cause

    monkeypatch.setattr(run_mod, "run_pipeline",
                        lambda *a, **k: (_ for _ in ()).throw(FakeRayTaskError(DataError("bad row 7"))))
    assert cli.main(["run", str(_config_file(tmp_path))]) == 1
    assert capsys.readouterr().err == "lethe: bad row 7\n"

    monkeypatch.setattr(run_mod, "run_pipeline",
                        lambda *a, **k: (_ for _ in ()).throw(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):  # not Lethe's own error: the traceback stays
        cli.main(["run", str(_config_file(tmp_path))])


def test_cli_subprocess_prints_no_traceback(tmp_path):
    """The real entry point, in a fresh interpreter: a bad config is its lines, no traceback."""
    cfg = _config_file(tmp_path, name="..")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "name: Value error, '..' is not a usable name" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_name_must_be_one_path_component():
    for bad in ("..", "."):
        with pytest.raises(ConfigError, match="not a usable name"):
            config_from_dict({**MINIMAL, "name": bad})
    with pytest.raises(ConfigError, match="models.0.name"):
        config_from_dict({**MINIMAL, "models": [{**MINIMAL["models"][0], "name": ".."}]})
    with pytest.raises(ConfigError):
        config_from_dict({**MINIMAL, "name": "a/b"})
    assert config_from_dict({**MINIMAL, "name": "v1.2"}).name == "v1.2"


# ----------------------------------------------------------------------------- masking


def test_one_masking_function_covers_env_urls_queries_and_token_shapes(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cr3t-value-123")
    monkeypatch.setenv("SOME_FLAG", "s3cr3t-not-named-secret")
    text = ("uri=https://alice:pw0rd@mlflow.example.com/ token s3cr3t-value-123 "
            "s3://b/x?X-Amz-Signature=abcdef&y=1 hf_abcdefghijklmnopqrstuvwxyz "
            "flag s3cr3t-not-named-secret")
    masked = mask_secrets(text)
    for secret in ("alice", "pw0rd", "s3cr3t-value-123", "abcdef&", "hf_abcdefghij"):
        assert secret not in masked
    assert "https://***@mlflow.example.com/" in masked and "y=1" in masked
    assert "s3cr3t-not-named-secret" in masked  # not named like a secret: kept
    nested = mask_obj({"tracking": {"tracking_uri": "http://u:p@h:5000"}, "n": 3, "l": ["x"]})
    assert nested == {"tracking": {"tracking_uri": "http://***@h:5000"}, "n": 3, "l": ["x"]}


# ----------------------------------------------------------------------------- evaluation


def test_failed_evaluation_keeps_and_logs_finished_models(tmp_path, monkeypatch, capsys):
    from orchestrator.evaluation.ray_stage import EvaluationFailed
    from orchestrator.pipeline import evaluate_stage

    cfg = config_from_dict({**MINIMAL, "run_dir": str(tmp_path)})

    def fake_labelled(cfg, wanted, synthetic):
        failed = EvaluationFailed({"m/forget/s0": "OSError: model.safetensors truncated"},
                                  {"m/sft/s0": {"task": {"acc": 0.5}}})
        failed.dirs = {"m/sft/s0": tmp_path / "eval-sft"}
        raise failed

    class Track:
        logged: dict = {}

        def log_eval(self, results, dirs):
            Track.logged = dict(results)

    class Outcome:
        spec = cfg.models[0]
        base_model = ""
        models = {("sft", 0): "a", ("forget", 0): "b"}

    monkeypatch.setattr(evaluate_stage, "evaluate_labelled", fake_labelled)
    with pytest.raises(EvaluationFailed) as err:
        evaluate_stage.evaluate_outcomes(cfg, [Outcome()], None, Track())
    assert Track.logged == {"m/sft/s0": {"task": {"acc": 0.5}}}
    report = json.loads((tmp_path / "faults" / "eval_failures.json").read_text())
    assert report == {"failed": {"m/forget/s0": "OSError: model.safetensors truncated"},
                      "finished": ["m/sft/s0"]}
    assert cli.error_line(err.value) == (
        "evaluation failed for 1 of 2 model(s), finished results kept (a rerun evaluates only "
        "the failed): m/forget/s0: OSError: model.safetensors truncated")
