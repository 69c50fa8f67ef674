"""Offline defaults belong to the embedded local Ray instance, never to a cluster job
(orchestrator/embedded.py, issue 22 item 3).

The CLI decides before anything imports the hub libraries: `lethe run` on this machine (no
ray.address, no RAY_ADDRESS) gets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE = 1; the driver of a
`ray job submit` job (Ray sets RAY_ADDRESS for the entry point), a config whose ray.address
names a cluster, `lethe plan --address`, and a preflight (`--check`) get neither, nor a
DS_ACCELERATOR or TORCH_EXTENSIONS_DIR taken from the submitting machine.
"""

from __future__ import annotations

import os

import pytest

from orchestrator.embedded import (
    EMBEDDED_ENV,
    OFFLINE_ENV,
    environment_defaults,
    in_embedded_instance,
    joins_cluster,
)

PAPER = "configs/paper/llama3.2-1b.yaml"
MACHINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")


@pytest.mark.parametrize(("address", "ray_address", "cluster"), [
    (None, None, False), ("", None, False), ("local", None, False), ("  local ", "", False),
    ("auto", None, True), ("ray://head:10001", None, True), ("10.0.0.5:6379", None, True),
    (None, "127.0.0.1:6379", True), ("local", "http://head:8265", True),
])
def test_joins_cluster(address, ray_address, cluster):
    env = {} if ray_address is None else {"RAY_ADDRESS": ray_address}
    assert joins_cluster(address, env) is cluster


def test_embedded_defaults_go_offline_and_cluster_defaults_do_not():
    embedded: dict[str, str] = {}
    environment_defaults(embedded=True, environ=embedded)
    assert {k: embedded[k] for k in OFFLINE_ENV} == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    assert embedded["DS_ACCELERATOR"] in ("cpu", "cuda") and "TORCH_EXTENSIONS_DIR" in embedded

    job: dict[str, str] = {}
    environment_defaults(embedded=False, environ=job)
    assert not set(MACHINE_ENV) & set(job), job
    # The machine-independent defaults stay for both.
    for env in (embedded, job):
        assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["TOKENIZERS_PARALLELISM"] == "false"

    # A value the user set is never replaced, in either mode.
    mine = {"HF_HUB_OFFLINE": "0"}
    environment_defaults(embedded=True, environ=mine)
    assert mine["HF_HUB_OFFLINE"] == "0" and mine["HF_DATASETS_OFFLINE"] == "1"


def test_in_embedded_instance_reads_the_marker():
    assert in_embedded_instance({EMBEDDED_ENV: "1"})
    assert not in_embedded_instance({})
    assert not in_embedded_instance({EMBEDDED_ENV: "0"})


@pytest.fixture
def clean_env(monkeypatch):
    """os.environ as a copy without the switches the CLI decides (restored after)."""
    env = {k: v for k, v in os.environ.items() if k not in (*MACHINE_ENV, "RAY_ADDRESS")}
    monkeypatch.setattr(os, "environ", env)
    return env


def _cli(argv: list[str]) -> None:
    from orchestrator.cli import main

    assert main(argv) == 0


def test_a_local_run_is_offline(clean_env, capsys):
    _cli(["validate", "configs/demo.yaml"])
    assert clean_env["HF_HUB_OFFLINE"] == "1" and clean_env["HF_DATASETS_OFFLINE"] == "1"


def test_a_ray_job_submit_driver_is_never_offline(clean_env, capsys):
    """What `ray job submit -- python -m jobs.pipeline --config configs/paper/...` runs: the
    jobs entry point, with RAY_ADDRESS set by Ray's job supervisor."""
    from jobs._entry import entry

    clean_env["RAY_ADDRESS"] = "127.0.0.1:6379"
    assert entry("jobs.pipeline", "validate", argv=["--config", PAPER]) == 0
    assert not set(MACHINE_ENV) & set(clean_env), {k: clean_env[k] for k in MACHINE_ENV if k in clean_env}


@pytest.mark.parametrize("argv", [
    ["validate", "configs/demo.yaml", "ray.address=ray://head.example:10001"],
    ["validate", PAPER, "ray.address=auto"],
])
def test_a_config_that_names_a_cluster_is_never_offline(clean_env, capsys, argv):
    _cli(argv)
    assert not set(MACHINE_ENV) & set(clean_env)


def test_plan_against_a_cluster_and_a_preflight_are_never_offline(clean_env):
    import argparse

    from orchestrator.cli import _runs_embedded

    def args(**kw):
        return argparse.Namespace(config="configs/demo.yaml", overrides=[], **kw)

    assert _runs_embedded(args(address=None))
    assert not _runs_embedded(args(address="10.0.0.5:6379"))
    assert not _runs_embedded(args(address=None, check=True))
