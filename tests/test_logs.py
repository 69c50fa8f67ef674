"""Console output: progress bars only on a terminal, one line per stage event in a log.

The switch is checked in fresh interpreters whose stdout is a pipe (a log file, `ray job
submit`) or a pseudo-terminal, since the libraries read their settings at import.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import logs

REPO = Path(__file__).resolve().parents[1]

# Prints what each library decided, as one JSON line; `early` imports them before the switch.
PROBE = r"""
import io, json, sys
early = sys.argv[1] == "early"
if early:
    import ray.data, transformers  # noqa: F401
from orchestrator.logs import configure_console, interactive, stage_event
configure_console()
import ray.data
import tqdm
from transformers.utils import logging as hf_logging
from huggingface_hub.utils import are_progress_bars_disabled
bar = io.StringIO()
for _ in tqdm.tqdm(range(3), file=bar):
    pass
for _ in tqdm.tqdm(range(3), file=bar, disable=False, desc="explicit"):  # as lm-eval does
    pass
print(json.dumps({
    "interactive": interactive(),
    "ray_data_bars": ray.data.DataContext.get_current().enable_progress_bars,
    "transformers_bars": hf_logging.is_progress_bar_enabled(),
    "hub_bars": not are_progress_bars_disabled(),
    "tqdm_output": bar.getvalue(),
}))
stage_event("reference", "tiny-llama", "done", 35.24)
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in logs.QUIET_ENV}
    env["PYTHONPATH"] = str(REPO)
    return env


def _probe_pipe(mode: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env or _clean_env(),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    return json.loads(lines[-2]), lines[-1]


def test_not_a_terminal_turns_every_progress_bar_off():
    state, stage = _probe_pipe("late")
    assert state == {"interactive": False, "ray_data_bars": False, "transformers_bars": False,
                     "hub_bars": False, "tqdm_output": ""}
    assert re.fullmatch(r"\[lethe\] \d\d:\d\d:\d\d stage reference   tiny-llama   done +35\.2 s",
                        stage), stage


def test_libraries_imported_before_the_switch_are_told_directly():
    state, _ = _probe_pipe("early")
    assert not state["ray_data_bars"] and not state["transformers_bars"] and not state["hub_bars"]


def test_user_settings_win():
    env = _clean_env()
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "0"  # the user wants Ray Data's bars in the log
    state, _ = _probe_pipe("late", env)
    assert state["ray_data_bars"] is True
    assert not state["transformers_bars"] and state["tqdm_output"] == ""


def test_a_terminal_keeps_the_progress_bars():
    main, sub = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", PROBE, "late"], cwd=REPO, env=_clean_env(),
                                stdout=sub, stderr=subprocess.DEVNULL, close_fds=True)
        os.close(sub)
        chunks = []
        while True:
            try:
                data = os.read(main, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(main)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    state = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
    assert state["interactive"] is True
    assert state["ray_data_bars"] and state["transformers_bars"] and state["hub_bars"]
    assert "3/3" in state["tqdm_output"] and "explicit" in state["tqdm_output"]


def test_configure_console_sets_only_unset_switches(monkeypatch):
    for key in logs.QUIET_ENV:  # set, then deleted: monkeypatch restores the original state
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    # This process's libraries stay as they are (the subprocess tests check that part).
    monkeypatch.setattr(logs, "worker_setup", lambda: None)
    monkeypatch.setattr(logs, "_interactive", None)
    logs.configure_console(interactive=True)
    assert all(k not in os.environ for k in logs.QUIET_ENV if k != "RAY_COLOR_PREFIX")
    assert logs.interactive() is True
    logs.configure_console(interactive=False)
    assert logs.interactive() is False
    assert os.environ["RAY_COLOR_PREFIX"] == "1"  # set by the user: kept
    assert logs.worker_env() == {**logs.QUIET_ENV, "RAY_COLOR_PREFIX": "1"}
    assert logs.ray_runtime_env() == {"env_vars": logs.worker_env(),
                                      "worker_process_setup_hook": "orchestrator.logs.worker_setup"}
    monkeypatch.setattr(logs, "_interactive", True)
    assert logs.ray_runtime_env() == {}


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0 s"), (35.24, "35.2 s"), (59.96, "60.0 s"),
                                               (61, "1 min 01 s"), (3725, "1 h 02 min")])
def test_format_duration(seconds, text):
    assert logs.format_duration(seconds) == text


def test_stage_line_columns():
    line = logs.stage_line("score", "tiny-qwen2", "cached", None, detail="key 2d199b78", when=0)
    assert re.fullmatch(r"\[lethe\] \d\d:\d\d:\d\d stage score       tiny-qwen2   cached  "
                        r"\s+ key 2d199b78", line), line
    assert logs.stage_line("evaluate", when=0).endswith("stage evaluate    -            done")


def test_stage_key_line_is_timed_and_keeps_the_key_columns():
    line = logs.stage_key_line("eval", "c00dd6c4d49a1cfe", "running", "(tiny-llama/base/-)", when=0)
    assert re.fullmatch(r"\[lethe\] \d\d:\d\d:\d\d stage eval        c00dd6c4d49a1cfe  running"
                        r"  \(tiny-llama/base/-\)", line), line
    # What tests/test_drills.py and tests/test_pipeline.py read from a run's output.
    m = re.search(r"\[lethe\] (?:\d\d:\d\d:\d\d )?stage (\S+)\s+([0-9a-f]{16})\s+(running|cached)",
                  logs.stage_key_line("scores", "2d199b78aa00ff11", "cached"))
    assert m is not None and m.groups() == ("scores", "2d199b78aa00ff11", "cached")
    assert re.search(r"stage scores +\w+  cached", logs.stage_key_line("scores", "2d199b78aa00ff11", "cached"))


# A Ray Train controller / worker process, without Ray: lethe's setup hook runs first (as
# Ray's worker_process_setup_hook does), then Ray Train's own logging set-up (its real
# LoggingManager dictConfig, on a stub run context), then each chatty module logs what it
# logs in a real run.
RAY_TRAIN_PROBE = r"""
import logging, sys
from types import SimpleNamespace
from orchestrator.logs import worker_setup
worker_setup()
import ray
from ray.train.v2._internal.logging import logging as train_logging
from ray.train.v2._internal.execution import storage
from ray.train.v2._internal.execution.worker_group import worker_group
from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client
from ray.train.v2._internal.execution.failure_handling import default as failure_policy
ray.get_runtime_context = lambda: SimpleNamespace(get_worker_id=lambda: "probe")
run = SimpleNamespace(get_run_config=lambda: SimpleNamespace(
    name="probe", logging_config=SimpleNamespace(log_level="INFO")))
train_logging.LoggingManager._resolve_log_level = staticmethod(lambda context: "INFO")
logging.config.dictConfig(train_logging.LoggingManager._get_worker_logger_config_dict(run))
storage.logger.info("Checkpoint successfully created at: Checkpoint(path=/x/checkpoint_0001)")
worker_group.logger.info("Started training worker group of size 1: \n- (ip=1.2.3.4) world_rank=0")
storage.logger.warning("a storage warning stays")
failure_policy.logger.info("[FailurePolicy] RETRY stays")
try:
    raise TimeoutError("Get timed out: some object(s) not ready.")
except TimeoutError:
    client.logger.warning("Failed to send resource request for train-1.", exc_info=True)
print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")  # as DeepSpeed
logging.getLogger().info("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
logging.getLogger("lethe.probe").info("a worker's own line stays")
"""


def _ray_train_probe(quiet: bool) -> list[str]:
    env = _clean_env()
    if quiet:
        env["LETHE_QUIET_WORKERS"] = "1"
    proc = subprocess.run([sys.executable, "-c", RAY_TRAIN_PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return (proc.stdout + proc.stderr).splitlines()


def test_ray_train_chatter_is_summarised_off_a_terminal():
    lines = _ray_train_probe(quiet=True)
    text = "\n".join(lines)
    assert "Checkpoint successfully created" not in text
    assert "Started training worker group" not in text and "world_rank" not in text
    # The record goes; the plain print stays here (Ray Train's print patch turns it into a
    # root-logger record in a real worker, as the probe's second line does).
    assert text.count("built successfully") == 1
    assert "a storage warning stays" in text and "[FailurePolicy] RETRY stays" in text
    assert "a worker's own line stays" in text
    warning = [line for line in lines if "Failed to send resource request" in line]
    assert warning == ["Failed to send resource request for train-1. "
                       "(TimeoutError: Get timed out: some object(s) not ready.)"]
    assert "Traceback" not in text


def test_ray_train_output_is_whole_without_the_switch():
    text = "\n".join(_ray_train_probe(quiet=False))
    assert "Checkpoint successfully created at: Checkpoint(path=/x/checkpoint_0001)" in text
    assert "world_rank=0" in text and "Traceback (most recent call last)" in text
    assert text.count("built successfully") == 2


def test_the_quieted_loggers_are_those_of_the_installed_ray_train():
    """Each named logger is the one its Ray Train module logs with, and that module still
    logs the message it is quieted for (a Ray upgrade that moves them fails here)."""
    import importlib
    import inspect

    said = {"ray.train.v2._internal.execution.storage": "Checkpoint successfully created",
            "ray.train._internal.storage": "Checkpoint successfully created",
            "ray.train.v2._internal.execution.worker_group.worker_group": "Started training worker group",
            "ray.train.v2._internal.execution.scaling_policy.scaling_policy": "Requesting resources",
            "ray.train.torch.config": "Setting up process group",
            "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
                "Failed to send resource request"}
    assert set(said) == {*logs.CHATTY_RAY_TRAIN_LOGGERS, *logs.ONE_LINE_WARNING_LOGGERS}
    for name, message in said.items():
        module = importlib.import_module(name)
        assert module.logger.name == name
        assert message in inspect.getsource(module), name
