"""Golden values: the training loss curve, exported weights and token scores of tiny models
for fixed seeds, bit for bit on CPU.

Recorded before the training loop became a recipe class (issue 13) and the three loss paths
became one: a refactor that changes any float here changed behaviour. `python
tests/test_training_golden.py` records the current values (only after an intended
change, with the reason in the commit message) writes them to tests/data/golden_*.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_training_support import make_base, make_corpus, make_job  # noqa: E402

# Per-report metrics that depend on the clock, not on the arithmetic.
TIMED = {"tokens_per_s", "step_time_s", "timing"}

GOLDEN: dict[str, dict] = {}


def _tensor_digest(path: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy()
                 .tobytes())
    return h.hexdigest()[:16]


def _plain(value):
    """nan as a string: nan != nan would fail an equality test that should pass."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _curve(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [_plain({k: v for k, v in json.loads(line).items() if k not in TIMED})
            for line in lines]


def _trainings(tmp: Path) -> dict[str, dict]:
    from orchestrator.training import run_training_local

    base = make_base(tmp / "base")
    data = make_corpus(tmp / "corpus.parquet", n=32)
    valid = str(make_corpus(tmp / "valid.parquet", n=8, seed=5, noise=0.0))
    kw = {"max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 2, "max_grad_norm": 0.5,
          "lambda": {"t_max": 0.5}, "warmup_ratio": 0.3}
    cases = {
        "forget-plain": make_job(tmp, base, data, method="forget", name="forget-plain",
                                 eval_every=1, checkpoint_every=2, **kw),
        "forget-zero2": make_job(tmp, base, data, method="forget", name="forget-zero2",
                                 deepspeed="configs/deepspeed/zero2.json",
                                 normalization="global", **kw),
        "sft-skip": make_job(tmp, base, data, method="sft", name="sft-skip",
                             on_nonfinite="skip", **kw),
    }
    cases["forget-plain"].validation_path = valid
    cases["sft-skip"].test_hooks = {"_nan_at_step": 2}
    out = {}
    for name, job in cases.items():
        result = run_training_local(job)
        final = {k: v for k, v in result.metrics.items()
                 if k not in TIMED | {"wall_seconds", "mean_tokens_per_s", "train_seconds"}}
        out[name] = {"curve": _curve(Path(job.storage_path) / job.run_name),
                     "final": _plain(final),
                     "weights": _tensor_digest(Path(result.export_dir) / "model.safetensors")}
    return out


def _scores() -> dict[str, list]:
    import torch

    from orchestrator.config import ModelSpec
    from orchestrator.models import build_model
    from orchestrator.scoring import TokenScorer

    spec = ModelSpec(name="tiny-qwen2", family="qwen2",
                     from_config={"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                  "num_kv_heads": 2, "intermediate_size": 64,
                                  "max_position_embeddings": 128})
    base, ref = (build_model(spec, 97, seed=s).eval() for s in (0, 1))
    rng = np.random.default_rng(3)
    ids, masks = [], []
    for i in range(12):
        n = int(rng.integers(1, 50)) if i else 1
        ids.append(rng.integers(0, 97, size=n).astype(np.int32))
        m = np.zeros(n, np.int8)
        m[int(rng.integers(0, n)):] = 1
        masks.append(m)
    batch = {"sample_id": np.arange(12), "input_ids": ids, "response_mask": masks}
    with torch.no_grad():
        out = TokenScorer.from_models(base, ref, token_budget=120, chunk_size=7)(batch)
    return {k: [np.asarray(r, np.float32).tobytes().hex() for r in out[k]]
            for k in ("base_loss", "ref_loss")}


@pytest.fixture(scope="module")
def trainings(tmp_path_factory) -> dict[str, dict]:
    return _trainings(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("case", ["forget-plain", "forget-zero2", "sft-skip"])
def test_training_is_bit_equal_to_the_recorded_run(trainings, case):
    want = json.loads((Path(__file__).parent / "data" / "golden_training.json").read_text())
    assert trainings[case] == want[case]


def test_scores_are_bit_equal_to_the_recorded_ones():
    want = json.loads((Path(__file__).parent / "data" / "golden_scores.json").read_text())
    assert _scores() == want


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(__file__).parent / "data"
        (data_dir / "golden_training.json").write_text(
            json.dumps(_trainings(Path(d)), indent=1, sort_keys=True) + "\n")
        (data_dir / "golden_scores.json").write_text(json.dumps(_scores(), indent=1) + "\n")
        print("recorded", data_dir / "golden_training.json", data_dir / "golden_scores.json")
