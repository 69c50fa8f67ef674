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
