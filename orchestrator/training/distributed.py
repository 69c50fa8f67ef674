"""The one door for collectives in the training loop: tensors go where the backend wants them.

NCCL only reduces CUDA tensors ("No backend type associated with device type cpu"), gloo
reduces CPU tensors, and a combined backend string such as "cpu:gloo,cuda:nccl" takes both.
Ray Train creates its workers' process group with exactly "nccl" on GPUs, while the loop's
bookkeeping (class counts, step sums, validation sums) lives on the host. `all_reduce`
moves a tensor to a device the group's backend serves (for NCCL: the current CUDA device,
which the worker context set), reduces it there, and writes the result back into the
caller's tensor, so a call site never has to know the backend.

The collective runs whenever a process group exists, even with one rank: the GPU check
proves a 1-rank NCCL reduction works, and a test can watch every collective on CPU.

`barrier` waits on a separate gloo group with a long timeout: at export, rank 0 merges and
writes a model (minutes for 16 GB on a shared filesystem) while the others wait, and an
NCCL barrier that long trips the process group's watchdog timeout.

Plain torch: no Ray import (the GPU check runs this without Ray installed).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# Which device type each backend reduces natively.
_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "xccl": "xpu", "hccl": "hpu"}
# Export can take a long time on rank 0 (merge LoRA, write tens of GB): the others wait.
EXPORT_BARRIER_TIMEOUT = datetime.timedelta(hours=4)

_long_wait_group: Any = None
_long_wait_group_of: Any = None  # the default group it was created under

T = TypeVar("T")


def backend_string(group: Any = None) -> str:
    """The group's backend as "device:backend,..." (e.g. "cuda:nccl" or "cpu:gloo,cuda:nccl")."""
    return str(dist.get_backend_config(group))


def backend_devices(backend: str) -> dict[str, str]:
    """{device type: backend} from a backend string.

    "nccl" -> {"cuda": "nccl"}; "gloo" -> {"cpu": "gloo"};
    "cpu:gloo,cuda:nccl" -> {"cpu": "gloo", "cuda": "nccl"}.
    """
    out: dict[str, str] = {}
    for part in str(backend).lower().split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            device, name = (s.strip() for s in part.split(":", 1))
        else:
            name = part
            if name not in _BACKEND_DEVICE:
                raise ValueError(f"unknown torch.distributed backend {name!r} in {backend!r} "
                                 f"(known: {', '.join(sorted(_BACKEND_DEVICE))})")
            device = _BACKEND_DEVICE[name]
        out.setdefault(device, name)
    if not out:
        raise ValueError(f"empty torch.distributed backend string {backend!r}")
    return out


def collective_device(backend: str, tensor_device: torch.device) -> torch.device:
    """Where a tensor on `tensor_device` must be reduced under `backend`.

    It stays where it is when the backend serves its device type; otherwise it goes to the
    backend's device: for CUDA the current device (each worker sets its own), never cuda:0
    by default. Fails clearly when the backend needs CUDA and none is visible.
    """
    served = backend_devices(backend)
    if tensor_device.type in served:
        return tensor_device
    if "cpu" in served:
        return torch.device("cpu")
    if "cuda" in served:
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch.distributed backend {backend!r} reduces CUDA tensors only, "
                               "and no CUDA device is visible to this process")
        return torch.device("cuda", torch.cuda.current_device())
    kind = next(iter(served))
    return torch.device(kind)


def all_reduce(t: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """Reduce `t` in place over the group (SUM unless `op`), whatever its device; returns `t`.

    Without an initialised process group this is the identity (a plain single process).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    op = dist.ReduceOp.SUM if op is None else op
    target = collective_device(backend_string(group), t.device)
    if target == t.device:
        dist.all_reduce(t, op=op, group=group)
        return t
    moved = t.to(target)
    dist.all_reduce(moved, op=op, group=group)
    t.copy_(moved)  # back on the caller's device (a host copy waits for the reduction)
    return t


def all_reduce_sums(sums: T, group: Any = None) -> T:
    """Sum a small dict or dataclass of numbers over all ranks in ONE collective.

    Values are packed into one float64 tensor (exact for counts below 2**53), reduced,
    and unpacked into a new object of the same type; ints stay ints.
    """
    if dataclasses.is_dataclass(sums) and not isinstance(sums, type):
        fields = {f.name: getattr(sums, f.name) for f in dataclasses.fields(sums)}
    elif isinstance(sums, dict):
        fields = dict(sums)
    else:
        raise TypeError(f"all_reduce_sums takes a dict or a dataclass instance, got {type(sums)!r}")
    bad = {k: v for k, v in fields.items()
           if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
        raise TypeError(f"all_reduce_sums: non-numeric field(s) {bad}")
    packed = torch.tensor([float(v) for v in fields.values()], dtype=torch.float64)
    all_reduce(packed, group=group)
    reduced = {k: (int(round(x)) if isinstance(fields[k], int) else float(x))
               for k, x in zip(fields, packed.tolist(), strict=True)}
    if isinstance(sums, dict):
        return reduced  # type: ignore[return-value]
    return dataclasses.replace(sums, **reduced)


def _long_wait() -> Any:
    """A gloo group over all ranks with a long timeout (created once per default group)."""
    global _long_wait_group, _long_wait_group_of
    default = dist.distributed_c10d._get_default_group()
    if _long_wait_group is None or _long_wait_group_of is not default:
        # new_group is itself collective: every rank reaches this line in the same order.
        _long_wait_group = dist.new_group(backend="gloo", timeout=EXPORT_BARRIER_TIMEOUT)
        _long_wait_group_of = default
    return _long_wait_group


def barrier(long_wait: bool = False) -> None:
    """Wait for every rank. `long_wait`: on a gloo group with a 4-hour timeout (export),
    so no NCCL watchdog fires while rank 0 writes; otherwise on the default group (with the
    current CUDA device named for NCCL, which otherwise has to guess it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if long_wait:
        dist.barrier(group=_long_wait())
        return
    served = backend_devices(backend_string())
    if "cpu" not in served and "cuda" in served and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def forget_groups() -> None:
    """Drop the cached gloo group (call before destroying the default process group)."""
    global _long_wait_group, _long_wait_group_of
    _long_wait_group = _long_wait_group_of = None
