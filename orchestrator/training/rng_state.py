"""Each rank's random streams saved beside its checkpoint shard and restored on resume.

Without them a resumed run re-seeds: dropout (LoRA's included) then draws other masks than
the uninterrupted run would have, and "resume continues exactly" holds only for models
without dropout. safetensors, not pickle: the states are integer arrays plus a few scalars.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch


def rng_state_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def save_rng_state(directory: Path, rank: int) -> None:
    """This rank's random streams (torch CPU / CUDA, numpy, Python) beside its checkpoint
    shard: after a resume, dropout (LoRA's included) draws what the uninterrupted run drew.
    safetensors, not pickle: the states are arrays of integers plus a few scalars."""
    from safetensors.torch import save_file

    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state(),
               "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
               "python_state": torch.tensor(py_state, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"numpy": json.dumps([np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]),
            "python": json.dumps([py_version, py_gauss])}
    save_file(tensors, str(directory / rng_state_file(rank)), metadata=meta)


def load_rng_state(directory: Path, rank: int) -> bool:
    """Restore what `save_rng_state` wrote for this rank; False when the checkpoint has none
    (written before RNG states were saved: the run goes on with freshly seeded streams)."""
    from safetensors import safe_open

    path = directory / rng_state_file(rank)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    np_kind, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    np.random.set_state((np_kind, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos,
                         np_has_gauss, np_gauss))
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(v) for v in tensors["python_state"].tolist()),
                     py_gauss))
    return True
