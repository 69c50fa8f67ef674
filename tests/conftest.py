"""Shared fixtures. One local Ray instance serves the whole test session."""

from __future__ import annotations

import os

import pytest

# Offline everywhere: no test may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# See pipeline.run.init_ray: a worker's report waits for the controller's poll, and the tiny
# test runs report every step. 0.1 s here (0.5 in the product) cut the training group and
# session tests from 128 to 103 s; a poll that outlasts it is only retried (no error).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Data's Parquet reader starts 32 footer-reading actors per read_parquet (Ray 2.60); the
# tests read one small file. One actor: the distributed partition tests 67 -> 35 s.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions"),
)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the whole session (started once, stopped at the end).

    `address="local"` always starts a fresh instance, so a Ray head started elsewhere on the
    machine (e.g. by the job-submission test) is never joined by accident. The CPU count is
    logical: 4 slots on the 2-core machine let 2 scoring actors or 2 Train workers and the
    driver-side Ray Data tasks run side by side.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            runtime_env={"env_vars": {k: os.environ[k] for k in (
                "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS",
            )}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """tests/test_training_support.py's tiny base model (a LLaMA of 2 layers built from a
    seed, and its trained tokenizer), built once for the session instead of once per
    training test module (8 builds before). Tests read it and never write into it: the
    folder's content is compared at the end of the session, and a change fails there."""
    import hashlib
    from pathlib import Path

    from test_training_support import make_base

    path = make_base(tmp_path_factory.mktemp("tiny-base") / "base")

    def digest() -> str:
        h = hashlib.sha256()
        for f in sorted(Path(path).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    before = digest()
    yield path
    assert digest() == before, f"a test wrote into the shared tiny base {path}"


@pytest.fixture(scope="session")
def report_page(tmp_path_factory):
    """(config, report path) of a fabricated finished run (tests/report_run.py), built once
    for tests/test_report.py and tests/test_report_browser.py."""
    from report_run import fabricate_run

    from orchestrator.tracking.report import write_report

    tmp = tmp_path_factory.mktemp("report")
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = fabricate_run(tmp)
        return cfg, write_report(cfg)
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
