"""Collectives on the backend's device, proven on CPU (point 1 of what a first GPU run needs;
the other points are in tests/test_gpu_readiness.py): the backend string maps to devices,
sums go in one collective, every training collective goes through the helper, host tensors
never reach NCCL, the export barrier outlasts Ray Train's process-group timeout, and local
training leaves the process environment as it found it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from test_training_support import make_corpus, make_job

from orchestrator.training import distributed, run_training_local


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("gpu_ready")
    return tmp, tiny_base, make_corpus(tmp / "corpus.parquet", n=16)


@pytest.fixture
def one_rank_gloo(monkeypatch):
    """A 1-rank gloo process group for the test's duration."""
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    distributed.forget_groups()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_strings_map_to_devices(monkeypatch):
    assert distributed.backend_devices("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert distributed.backend_devices("nccl") == {"cuda": "nccl"}
    assert distributed.backend_devices("gloo") == {"cpu": "gloo"}
    with pytest.raises(ValueError, match="unknown torch.distributed backend 'ncl'"):
        distributed.backend_devices("ncl")
    cpu = torch.device("cpu")
    # A combined backend reduces host tensors on the host (gloo): no device round trip.
    assert distributed.collective_device("cpu:gloo,cuda:nccl", cpu) == cpu
    # NCCL alone: host tensors go to the CURRENT CUDA device (the worker's own), not cuda:0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device("nccl", cpu) == torch.device("cuda", 3)
    assert distributed.collective_device("cuda:nccl", cpu) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="reduces CUDA tensors only"):
        distributed.collective_device("nccl", cpu)


@dataclass
class _Sums:
    pos_ce: float
    n_pos: int


def test_all_reduce_sums_one_collective(one_rank_gloo, monkeypatch):
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: calls.append(t.clone()) or real(t, **kw))
    out = distributed.all_reduce_sums(_Sums(pos_ce=2.5, n_pos=7))
    assert out == _Sums(pos_ce=2.5, n_pos=7) and isinstance(out.n_pos, int)
    assert distributed.all_reduce_sums({"a": 1.0, "b": 3}) == {"a": 1.0, "b": 3}
    assert len(calls) == 2 and calls[0].dtype == torch.float64  # one packed tensor per call
    t = torch.tensor([5, 2])
    assert distributed.all_reduce(t, op=dist.ReduceOp.MIN) is t and t.tolist() == [5, 2]
    with pytest.raises(TypeError, match="non-numeric"):
        distributed.all_reduce_sums({"a": "x"})


def test_every_training_collective_goes_through_the_helper(assets, monkeypatch):
    """run_training_local in a 1-rank gloo group that reports the backend Ray Train's NCCL
    workers would mix in ("cpu:gloo,cuda:nccl"): every all_reduce must come from the helper
    (which reduces even with one rank, so nothing hides), on a device the backend serves."""
    tmp, base, data = assets
    seen: list[tuple[str, str]] = []
    real_all_reduce = dist.all_reduce

    def watched(t, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        seen.append((caller, t.device.type))
        return real_all_reduce(t, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", watched)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    result = run_training_local(make_job(tmp, base, data, method="forget", name="collectives",
                                         max_steps=2, micro_batch_size=4))
    assert result.steps == 2
    assert len(seen) >= 6, seen  # row count, 2 x (counts + finite check), step sums
    callers = {c for c, _ in seen}
    assert callers == {"orchestrator.training.distributed"}, callers
    assert {d for _, d in seen} <= set(distributed.backend_devices("cpu:gloo,cuda:nccl"))


def test_host_tensors_are_never_handed_to_nccl(assets, monkeypatch):
    """A group that reports exactly "nccl" (Ray Train's GPU workers): the helper sends host
    tensors to the CUDA device NCCL serves, never reduces them where they are. Without CUDA
    it says so, from the training loop's first collective on, instead of NCCL's "No
    backend type associated with device type cpu" mid-run."""
    tmp, base, data = assets
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="reduces CUDA tensors only"):
        run_training_local(make_job(tmp, base, data, method="forget", name="nccl-host",
                                    max_steps=1, micro_batch_size=4))


def test_ray_train_gpu_workers_get_nccl_and_the_helper_serves_it(tmp_path):
    """Lethe passes no TorchConfig: Ray Train gives GPU workers exactly "nccl" (no CPU
    backend), which is why host tensors must go through the helper to the current device."""
    from orchestrator.config import TrainConfig
    from orchestrator.training.stage import make_trainer

    train = TrainConfig.model_validate({"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1.0})
    trainer = make_trainer(train, {"jobs": []}, "nccl-check", str(tmp_path))
    backend = trainer.backend_config.backend
    assert backend == "nccl", backend
    assert distributed.backend_devices(backend) == {"cuda": "nccl"}


def test_export_barrier_outlasts_ray_trains_process_group_timeout(one_rank_gloo, monkeypatch):
    """Rank 0 merges and writes the export while the others wait: that wait is on a gloo
    group whose timeout is far above the one Ray Train gives the NCCL group (30 min)."""
    from ray.train.torch.config import TorchConfig

    made, waited = [], []
    real_new_group, real_barrier = dist.new_group, dist.barrier
    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: made.append(kw) or real_new_group(*a, **kw))
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: waited.append(kw) or real_barrier(*a, **kw))
    distributed.barrier(long_wait=True)
    distributed.barrier(long_wait=True)
    assert len(made) == 1 and made[0]["backend"] == "gloo", made  # created once, reused
    assert made[0]["timeout"].total_seconds() >= 4 * TorchConfig().timeout_s
    assert len(waited) == 2 and all(w["group"] is distributed._long_wait() for w in waited)


def test_local_training_leaves_the_process_environment_as_it_found_it(assets, monkeypatch):
    """The launcher variables a local run sets for its 1-rank group are put back: a process
    started later (a `ray start`, a Ray worker) must not inherit a stale MASTER_PORT."""
    tmp, base, data = assets
    launch = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    for key in launch:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.9")  # a caller's own value survives
    run_training_local(make_job(tmp, base, data, method="sft", name="env", max_steps=1,
                                micro_batch_size=4))
    assert {key: os.environ.get(key) for key in launch} == {
        "MASTER_ADDR": "10.0.0.9", **{key: None for key in launch[1:]}}
