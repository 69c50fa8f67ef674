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

    def fake_labelled(cfg, wanted, synthetic, revisions=None):
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


# ----------------------------------------------------------------------------- tracking


_PREPARE_IN_STAGE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from lethe_tiny_tokenizers import build_tokenizer
from orchestrator import cli
from orchestrator.cache import Stage
from orchestrator.config import DataConfig
from orchestrator.data import prepare_dataset
if len(sys.argv) > 4:  # no mount allowed: a per-process file size limit stands in for it
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
st = Stage(Path(sys.argv[1]), "tokens", {"k": 1})
if not st.open():
    try:
        prepare_dataset(DataConfig(source="file", path=sys.argv[2], max_seq_len=64),
                        build_tokenizer(), st.dir)
    except OSError as exc:
        print("ERROR", cli.error_line(exc), flush=True)
        sys.exit(1)
    st.mark_done()
print("DONE", flush=True)
"""


def _run_prepare(root: Path, src: Path, *limit: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PREPARE_IN_STAGE, str(root), str(src),
                           str(ROOT / "tests" / "data"), *limit],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_disk_full_is_a_clear_error_and_the_next_run_needs_no_cleaning(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?",
                                       "completion": f"The answer is {2 * i}."}) + "\n"
                           for i in range(3000)))
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            filler = mnt / "filler.bin"
            filler.write_bytes(b"\0" * (1024 * 1024 - 32 * 1024))  # 32 KB left: tokens need ~60
            first = _run_prepare(mnt, src)
        else:  # no mount permitted (not root, a container): RLIMIT_FSIZE in the child
            first = _run_prepare(mnt, src, str(16 * 1024))
        assert first.returncode == 1, first.stdout + first.stderr
        line = next(ln for ln in first.stdout.splitlines() if ln.startswith("ERROR"))
        assert ("No space left on device" in line or "File too large" in line), line
        assert "tokens.parquet" in line or "rejects.jsonl" in line
        stage_dir = next((mnt / "tokens").iterdir())
        assert not (stage_dir / "_SUCCESS.json").exists()
        assert not [p for p in stage_dir.rglob("*") if p.name.endswith(".tmp")]  # no debris
        if mounted:
            filler.unlink()  # space is back
        second = _run_prepare(mnt, src)
        assert second.returncode == 0 and "DONE" in second.stdout, second.stdout + second.stderr
        assert (stage_dir / "_SUCCESS.json").exists() and (stage_dir / "tokens.parquet").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.ray
@pytest.mark.slow
def test_truncated_part_and_stale_temp_are_recomputed(ray_local, tmp_path):
    """A part file cut short (a killed copy, a failing disk) and a killed writer's temp file:
    the rerun drops the part, removes the temp, recomputes that block only, and the scores
    and the partition equal an uninterrupted run's."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_scoring import _assert_close_scores, _make_rows, _tiny_spec, _write_tokens

    from orchestrator.cache import SUCCESS
    from orchestrator.config import PartitionConfig, ScoringConfig
    from orchestrator.models import build_model
    from orchestrator.partition import run_partition
    from orchestrator.scoring import run_scoring, score_files

    models = []
    for role, seed in (("base", 0), ("ref", 1)):
        build_model(_tiny_spec("llama"), 97, seed=seed).save_pretrained(str(tmp_path / role))
        models.append(str(tmp_path / role))
    tokens = _write_tokens(_make_rows(40), tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=1, batch_size=8, token_budget=200)
    clean = run_scoring(tokens, *models, cfg, tmp_path / "clean", embedded=True)

    hurt = tmp_path / "hurt"
    shutil.copytree(clean, hurt)
    (hurt / SUCCESS).unlink()
    part = score_files(hurt)[0]
    lost = pq.read_table(part, columns=["sample_id"]).num_rows
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    temp = hurt / f"_{part.name}.4242.0badc0de.tmp"
    temp.write_bytes(b"half a file")
    run_scoring(tokens, *models, cfg, hurt, embedded=True)
    summary = json.loads((hurt / SUCCESS).read_text())
    assert summary["rows_scored_this_run"] == lost and summary["rows_skipped"] == 40 - lost
    assert not temp.exists()
    read = lambda d: pa.concat_tables([pq.read_table(p) for p in score_files(d)])  # noqa: E731
    _assert_close_scores(read(clean), read(hurt), atol=1e-6)

    reports = [run_partition(tokens, d, PartitionConfig(rho=0.7), tmp_path / f"part-{d.name}")
               for d in (clean, hurt)]
    assert reports[0]["threshold"] == reports[1]["threshold"]
    tables = [pq.read_table(tmp_path / f"part-{d.name}" / "partitioned.parquet")
              for d in (clean, hurt)]
    _assert_same_table(*tables)


def _assert_same_table(a, b) -> None:
    """Bit-equal columns, NaN positions included (Arrow's equals treats NaN != NaN)."""
    import numpy as np
    import pyarrow as pa

    assert a.schema.equals(b.schema) and a.num_rows == b.num_rows
    for name in a.column_names:
        ca, cb = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_list(ca.type):
            np.testing.assert_array_equal(ca.offsets.to_numpy(), cb.offsets.to_numpy())
            ca, cb = ca.flatten(), cb.flatten()
        np.testing.assert_array_equal(ca.to_numpy(zero_copy_only=False),
                                      cb.to_numpy(zero_copy_only=False), err_msg=name)


def test_eval_stages_are_locked_stored_and_released(tmp_path, monkeypatch):
    import orchestrator.evaluation as evaluation
    from orchestrator.cache import Stage
    from orchestrator.evaluation.ray_stage import EvaluationFailed
    from orchestrator.pipeline.evaluate_stage import evaluate_labelled

    cfg = config_from_dict({**MINIMAL, "run_dir": str(tmp_path)})
    calls = []

    def fake_many(todo, ev_cfg, include, timings=None, revisions=None):
        calls.append(sorted(todo))
        if "m/bad/s0" in todo:
            raise EvaluationFailed({"m/bad/s0": "RuntimeError: boom"},
                                   {k: {"t": {"acc": 1.0}} for k in todo if k != "m/bad/s0"})
        return {k: {"t": {"acc": 0.5}} for k in todo}

    monkeypatch.setattr(evaluation, "evaluate_many", fake_many)
    wanted = {"m/sft/s0": "/models/a", "m/bad/s0": "/models/b"}
    with pytest.raises(EvaluationFailed) as err:
        evaluate_labelled(cfg, wanted, None)
    assert set(err.value.results) == {"m/sft/s0"} and set(err.value.dirs) == {"m/sft/s0"}
    bad = next(d for d in (tmp_path / "faults" / "stages" / "eval").iterdir() if d.is_dir()
               and json.loads((d / "inputs.json").read_text())["model"] == "/models/b")
    assert not (bad / "_SUCCESS.json").exists()
    assert not Stage(tmp_path / "faults" / "stages", "eval",
                     json.loads((bad / "inputs.json").read_text())).lock.held_here()
    results, _ = evaluate_labelled(cfg, {"m/sft/s0": "/models/a"}, None)  # cached: no call
    assert calls == [["m/bad/s0", "m/sft/s0"]] and results["m/sft/s0"] == {"t": {"acc": 1.0}}
