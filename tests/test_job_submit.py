"""`ray job submit` against a Ray head started here on 127.0.0.1, stopped by PID.

The head runs with token authentication disabled for both ends (Ray 2.60 turns it on for
local clusters by default) and every port chosen free, so it never collides with the test
session's own local Ray instance.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from proc_tree import free_port, stop_tree
from tiny_configs import TINY, runs_frame

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture()
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are capped
    dash = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--num-cpus=4", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 90
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        yield address
    finally:
        stop_tree(proc, grace=2)  # exactly what this fixture started, and everything under it
        shutil.rmtree(temp_dir, ignore_errors=True)

def test_pipeline_through_ray_job_submit(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    raw = dict(TINY, name="job-test", run_dir=str(tmp_path / "runs"))
    raw["train"] = dict(TINY["train"], methods=["forget"])
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--no-wait",
         "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.local.yaml"),
         "--", "python", "-m", "jobs.pipeline", "--config", str(cfg_path)],
        env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)  # output has ANSI codes

    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 600
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "pipeline finished" in logs

    uri = f"sqlite:///{tmp_path}/runs/job-test/mlflow.db"
    runs = runs_frame(uri, "job-test")
    forget = runs[runs["tags.method"] == "forget"]
    assert len(forget) == 1
    assert 0.0 <= forget.iloc[0]["metrics.eval/lethe_synth_mc/acc"] <= 1.0
