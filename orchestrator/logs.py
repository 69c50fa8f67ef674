"""Console output for humans (a terminal) and for machines (a file, `ray job submit`, CI).

On a terminal nothing changes: progress bars redraw in place. When stdout is not a
terminal, a redrawn bar becomes hundreds of lines (the baseline `make demo` log was 80 %
blank lines and Ray Data progress), so `configure_console` turns every progress bar off,
in this process and in the Ray workers it starts, and leaves one line per stage event:

    [lethe] 08:21:07 stage reference   tiny-llama  done      35.2 s

Worker output reaches the driver through Ray's log forwarding, which already folds lines
repeated across workers into one ("[repeated 3x across cluster]"). Off a terminal, the
workers' own chatter is summarised too (`quiet_ray_train`): Ray Train's per-run and
per-checkpoint INFO lines are dropped (lethe's stage lines say when each training starts and
ends), a transient warning keeps its line but not its traceback, and DeepSpeed's "op built
successfully" notes go; every other warning and error, and Ray Train's failure-policy
decisions, stay.

Switches, each left alone when the user has set it:
    RAY_DATA_DISABLE_PROGRESS_BARS=1   Ray Data's bars and per-operator status lines, in every
                                       process that imports ray.data (workers inherit it)
    TQDM_DISABLE=1                     every tqdm bar (lm-eval, datasets, DeepSpeed ...)
    HF_HUB_DISABLE_PROGRESS_BARS=1     huggingface_hub and transformers ("Loading weights",
                                       "Writing model shards")
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false   MLflow's artifact up/download bars
    RAY_COLOR_PREFIX=0                 no ANSI colour codes around "(pid=...)" prefixes
    LETHE_QUIET_WORKERS=1              the worker chatter above summarised (`quiet_ray_train`)
Modules already imported read their switch at import, so they are also told directly,
and tqdm bars created with an explicit `disable=False` (lm-eval's request bars) are switched
off by `force_tqdm_off`. Ray workers run the same switches through `worker_setup`, named as
the runtime env's `worker_process_setup_hook` (see `ray_runtime_env`).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import IO, Any

QUIET_ENV: dict[str, str] = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_COLOR_PREFIX": "0",
    "LETHE_QUIET_WORKERS": "1",
}

# Ray Train modules whose INFO lines repeat one event per run or per checkpoint: the 3-seed
# demo's file log had 22 "Checkpoint successfully created at ..." lines and, per family,
# "Requesting resources", "Attempting to start training worker group", "Started training
# worker group" with one line per worker, "Setting up process group". Named one by one (and
# checked against the installed Ray by tests/test_logs.py) because Ray Train's other INFO
# lines matter: the failure policy's retry decisions, a replaced replica group.
CHATTY_RAY_TRAIN_LOGGERS = (
    "ray.train.v2._internal.execution.storage",  # Checkpoint successfully created at: ...
    "ray.train._internal.storage",  # the same in Train V1 (Tune's trial checkpoints)
    "ray.train.v2._internal.execution.worker_group.worker_group",  # worker group start
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy",  # Requesting resources
    "ray.train.torch.config",  # Setting up process group for: env://
)
# Loggers whose warnings are transient and whose traceback adds nothing to the first line
# (the autoscaling coordinator's resource request timing out on a busy CPU: 17 lines).
ONE_LINE_WARNING_LOGGERS = (
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)

_interactive: bool | None = None


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced by a non-file object
        return False


def configure_console(interactive: bool | None = None) -> None:
    """Progress bars only on a terminal. Call once at start, before `ray.init`, so the Ray
    workers of a local instance inherit the switches (a remote cluster's workers get them
    through the job's runtime env: see `worker_env`). `interactive` overrides the check of
    stdout (tests, `--no-progress` style flags)."""
    global _interactive
    _interactive = is_terminal() if interactive is None else interactive
    if _interactive:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    worker_setup()


def force_tqdm_off() -> None:
    """Every tqdm bar of this process off, even one created with `disable=False` (lm-eval
    passes it explicitly, so TQDM_DISABLE alone does not reach its bars)."""
    import tqdm.std

    cls = tqdm.std.tqdm
    if getattr(cls, "_lethe_forced_off", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > 10:  # `disable` is tqdm's 11th positional parameter
            args = (*args[:10], True, *args[11:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    cls._lethe_forced_off = True


def worker_setup() -> None:
    """Ray `worker_process_setup_hook`: the switches of `configure_console` in a worker
    (its environment already carries them on a local instance or through the runtime env)."""
    if os.environ.get("TQDM_DISABLE") == "1":
        force_tqdm_off()
    if os.environ.get("LETHE_QUIET_WORKERS") == "1":
        quiet_ray_train()
    _quiet_loaded_modules()


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _WithoutTraceback(logging.Filter):
    """The record on one line: its exception's type and message replace the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class _NoBuildNotes(logging.Filter):
    """DeepSpeed prints "DeepSpeed <op> built successfully" each time a process loads its
    shared-memory op (twice per training worker); Ray Train hands that print to the root
    logger as an INFO record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not isinstance(record.msg, str):
            return True
        return not (record.msg.startswith("DeepSpeed ") and record.msg.endswith(" built successfully"))


def _add_filter(logger: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def quiet_ray_train() -> None:
    """Summarise Ray Train's worker and controller output (see the module doc). The filters
    sit on the loggers that create the records, so they outlast the `dictConfig` with which
    Ray Train sets up its controller and worker logging (it resets levels and handlers of
    those loggers, never their filters); they run before any Ray Train module is imported.
    Ray Train's own log files in the Ray session directory get the same, summarised records
    (`LETHE_QUIET_WORKERS=0` keeps every line there and in the console)."""
    for name in CHATTY_RAY_TRAIN_LOGGERS:
        _add_filter(logging.getLogger(name), _WarningsOnly)
    for name in ONE_LINE_WARNING_LOGGERS:
        _add_filter(logging.getLogger(name), _WithoutTraceback)
    _add_filter(logging.getLogger(), _NoBuildNotes)


def ray_runtime_env() -> dict[str, Any]:
    """What `ray.init(runtime_env=...)` needs for quiet workers (empty on a terminal)."""
    if interactive():
        return {}
    return {"env_vars": worker_env(), "worker_process_setup_hook": "orchestrator.logs.worker_setup"}


def _quiet_loaded_modules() -> None:
    """Switch off the bars of libraries imported before `configure_console` ran."""
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1" and "ray.data" in sys.modules:
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = False
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def interactive() -> bool:
    """Whether the console was configured for a terminal (stdout's check if never set)."""
    return is_terminal() if _interactive is None else _interactive


def worker_env() -> dict[str, str]:
    """The switches in force, for a Ray runtime env (`ray job submit`, a remote cluster)."""
    return {k: os.environ[k] for k in QUIET_ENV if k in os.environ}


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _clock(when: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time.time() if when is None else when))


def stage_line(stage: str, model: str = "-", event: str = "done", seconds: float | None = None,
               detail: str = "", when: float | None = None) -> str:
    """`[lethe] 08:21:07 stage reference   tiny-llama  done      35.2 s  <detail>`: fixed
    columns, so a log can be grepped and read as a table."""
    clock = _clock(when)
    took = "" if seconds is None else format_duration(seconds)
    line = f"[lethe] {clock} stage {stage:<11} {model:<12} {event:<8} {took:>9}"
    return f"{line}  {detail}".rstrip() if detail else line.rstrip()


def stage_key_line(stage: str, key: str, state: str, detail: str = "",
                   when: float | None = None) -> str:
    """`[lethe] 08:21:07 stage reference   f3fe30f4407f674b  running  (tiny-llama/forget/s0)`:
    a stage's cache key found `cached` or being computed (`running`), timed like the
    `stage_line` that reports its end."""
    clock = _clock(when)
    line = f"[lethe] {clock} stage {stage:<11} {key}  {state}"
    return f"{line}  {detail}" if detail else line


def stage_event(stage: str, model: str = "-", event: str = "done", seconds: float | None = None,
                detail: str = "", stream: IO[str] | None = None) -> None:
    """Print one stage event (start, cached, done, failed) as one flushed line."""
    print(stage_line(stage, model, event, seconds, detail), file=stream or sys.stdout, flush=True)
