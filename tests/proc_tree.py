"""Helpers for the tests that start their own servers (Ray heads, MLflow): a free loopback
port, and stopping exactly the process a test started with everything under it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tree(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, to `proc` and every process under it
    (listed before the first signal: raylet, GCS, dashboard, workers); then reap `proc`."""
    pids = [proc.pid]
    try:
        pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM:
            time.sleep(grace)
    proc.wait(timeout=30)
