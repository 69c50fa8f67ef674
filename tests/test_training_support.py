"""Shared builders for the training tests (tiny model, token corpus) + fast data-path tests.

The corpus is built directly in token ids with a learnable structure: each response is a
run of consecutive ids (next = previous + 1) from the "positive" range, with ~25 % of its
tokens replaced by random ids from a separate "noise" range (class -1).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config import ModelSpec, TrainConfig
from orchestrator.training.collate import IGNORE_INDEX, collate
from orchestrator.training.data import StepPlan, rows_from_table, select_subset, shard_for_rank
from orchestrator.training.deepspeed_setup import fill_deepspeed_config, load_deepspeed_config
from orchestrator.training.job import SubsetSpec, TrainJob

VOCAB = 300
POS_RANGE = (100, 200)
NOISE_RANGE = (210, 290)


def tiny_spec() -> ModelSpec:
    return ModelSpec(name="tiny", family="llama", tokenizer_vocab_size=VOCAB,
                     from_config={"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                  "num_kv_heads": 2, "intermediate_size": 64,
                                  "max_position_embeddings": 128})


def make_base(out_dir: Path) -> str:
    from orchestrator.models import materialize_base

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
                      for _ in range(50)) for _ in range(200)]
    path = materialize_base(tiny_spec(), texts, out_dir)
    from orchestrator.models import load_tokenizer

    assert len(load_tokenizer(tiny_spec(), path)) == VOCAB
    return path


def make_corpus(path: Path, n: int = 64, seed: int = 0, noise: float = 0.25) -> Path:
    rng = np.random.default_rng(seed)
    rows = {"sample_id": [], "input_ids": [], "response_mask": [], "noise_mask": [],
            "token_class": [], "num_tokens": []}
    for i in range(n):
        prompt = rng.integers(10, 90, size=int(rng.integers(4, 8)))
        length = int(rng.integers(10, 18))
        start = int(rng.integers(POS_RANGE[0], POS_RANGE[1] - length))
        resp = np.arange(start, start + length)
        is_noise = rng.random(length) < noise
        resp = np.where(is_noise, rng.integers(*NOISE_RANGE, size=length), resp)
        ids = np.concatenate([prompt, resp]).astype(np.int32)
        rmask = np.concatenate([np.zeros(len(prompt)), np.ones(length)]).astype(np.int8)
        nmask = np.concatenate([np.zeros(len(prompt)), is_noise]).astype(np.int8)
        cls = np.where(nmask == 1, -1, rmask).astype(np.int8)
        for k, v in (("sample_id", i), ("input_ids", ids.tolist()), ("response_mask", rmask.tolist()),
                     ("noise_mask", nmask.tolist()), ("token_class", cls.tolist()),
                     ("num_tokens", len(ids))):
            rows[k].append(v)
    schema = pa.schema([("sample_id", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                        ("response_mask", pa.list_(pa.int8())), ("noise_mask", pa.list_(pa.int8())),
                        ("token_class", pa.list_(pa.int8())), ("num_tokens", pa.int32())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), path)
    return path


def make_job(tmp: Path, base: str, data: Path, *, method: str = "sft", name: str = "run",
             **train_kw) -> TrainJob:
    train = {"lr": 3e-3, "micro_batch_size": 8, "grad_accum_steps": 1, "epochs": 1.0,
             "warmup_ratio": 0.0, "num_workers": 1, "deepspeed": None, "seed": 0,
             "cpus_per_worker": 0.9, **train_kw}
    return TrainJob(train_path=str(data), base_model_path=base, model=tiny_spec(),
                    train=TrainConfig.model_validate(train), method=method,
                    class_column="response_mask" if method == "sft" else "token_class",
                    output_dir=str(tmp / name / "out"), run_name=name,
                    storage_path=str(tmp / name / "ray"))


def exported_weights(result) -> dict[str, torch.Tensor]:
    """The weights a training result exported (model.safetensors of its HF folder)."""
    from safetensors.torch import load_file

    return load_file(str(Path(result.export_dir) / "model.safetensors"))


def mean_ce_by_class(model_dir: str, data: Path) -> dict[int, float]:
    """Mean next-token CE of an exported model over class +1 and class -1 tokens."""
    from orchestrator.models import load_model, token_losses

    model = load_model(model_dir, tiny_spec()).eval()
    table = pq.read_table(data)
    sums = {1: 0.0, -1: 0.0}
    counts = {1: 0, -1: 0}
    with torch.no_grad():
        for ids, cls in zip(table.column("input_ids").to_pylist(),
                            table.column("token_class").to_pylist(), strict=True):
            x = torch.tensor([ids])
            c = torch.tensor([cls])
            ce = token_losses(model, x, torch.ones_like(x), c != 0)[0]
            for k in (1, -1):
                sums[k] += float(ce[c[0] == k].sum())
                counts[k] += int((c[0] == k).sum())
    return {k: sums[k] / counts[k] for k in (1, -1)}


# ----------------------------------------------------------------------------- fast tests


def test_collate_pads_and_shifts_class_like_labels():
    ids = [np.array([5, 6, 7, 8]), np.array([9, 10])]
    cls = [np.array([0, 1, -1, 1], np.int8), np.array([0, 1], np.int8)]
    b = collate(ids, cls, pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    i = IGNORE_INDEX
    # The last token of the longest row is a target (predicted at position 2).
    assert b["labels"].tolist() == [[6, 7, 8, i], [10, i, i, i]]
    assert b["target_class"].tolist() == [[1, -1, 1, 0], [1, 0, 0, 0]]


def test_rows_validation_names_the_sample(tmp_path):
    table = pa.table({"sample_id": [3, 7], "input_ids": [[1, 2, 3], [4, 5]],
                      "token_class": [[0, 1, 1], [0, 1, 1]]})
    with pytest.raises(ValueError, match="sample_id 7: token_class has 3 entries"):
        rows_from_table(table, "token_class")
    table = pa.table({"sample_id": [3], "input_ids": [[1, 2, 3]], "token_class": [[0, 2, 1]]})
    with pytest.raises(ValueError, match="sample_id 3: token_class value 2"):
        rows_from_table(table, "token_class")
    with pytest.raises(ValueError, match="lacks column 'response_mask'"):
        rows_from_table(table, "response_mask")
    twice = pa.table({"sample_id": [5, 2, 5], "input_ids": [[1], [2], [1]],
                      "token_class": [[1], [1], [1]]})
    with pytest.raises(ValueError, match="sample_id 5 occurs more than once"):
        rows_from_table(twice, "token_class")


def test_rows_shard_and_subset_are_deterministic(tmp_path):
    data = make_corpus(tmp_path / "c.parquet", n=10)
    rows = rows_from_table(pq.read_table(data), "token_class")
    assert len(rows) == 10 and rows.row(3)[0].tolist() == pq.read_table(data)["input_ids"][3].as_py()
    a, b = shard_for_rank(rows, 0, 3), shard_for_rank(rows, 1, 3)
    assert a.sample_ids.tolist() == [0, 3, 6] and b.sample_ids.tolist() == [1, 4, 7]
    sub = select_subset(rows.sample_ids, SubsetSpec(fraction=0.5, seed=1))
    assert len(sub) == 5 and sub.tolist() == select_subset(rows.sample_ids,
                                                           SubsetSpec(fraction=0.5, seed=1)).tolist()
    assert sub.tolist() != select_subset(rows.sample_ids, SubsetSpec(fraction=0.5, seed=2)).tolist()
    with pytest.raises(ValueError, match="exceeds the training pool of 10"):
        select_subset(rows.sample_ids, SubsetSpec(size=11))


def test_step_plan_counts_and_positions():
    plan = StepPlan.build(rows_per_rank=30, micro=4, gas=2, epochs=2.0, max_steps=None)
    assert plan.micro_per_epoch == 8 and plan.total_updates == 8
    assert plan.locate(9) == (1, 1)
    assert StepPlan.build(30, 4, 3, 1.0, None).total_updates == 2  # tail micro-batches dropped
    assert StepPlan.build(30, 4, 1, 1.0, max_steps=20).total_updates == 20
    o1, o2 = plan.epoch_order(0, 5), plan.epoch_order(1, 5)
    assert sorted(o1.tolist()) == list(range(30)) and o1.tolist() != o2.tolist()


def test_deepspeed_config_is_filled_from_train_config():
    raw = load_deepspeed_config("configs/deepspeed/zero3.json")
    cfg = fill_deepspeed_config(raw, micro=4, gas=2, world=2, max_grad_norm=1.0,
                                dtype=torch.float32)
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="'zero_optimization.stage' is 'auto'"):
        fill_deepspeed_config({"zero_optimization": {"stage": "auto"}}, micro=1, gas=1, world=1,
                              max_grad_norm=None, dtype=torch.float32)
    with pytest.raises(ValueError, match="sets 'optimizer'"):
        fill_deepspeed_config({"optimizer": {}}, micro=1, gas=1, world=1, max_grad_norm=None,
                              dtype=torch.float32)


def test_job_round_trips_and_rejects_bad_method(tmp_path):
    job = make_job(tmp_path, "base", tmp_path / "d.parquet", method="forget")
    again = TrainJob.from_dict(job.to_dict())
    assert again.to_dict() == job.to_dict() and again.train_config().lr == 3e-3
    with pytest.raises(ValueError, match="method must be one of"):
        make_job(tmp_path, "base", tmp_path / "d.parquet", method="forgett")


def test_row_class_counts_are_counted_and_checked_on_the_host():
    from orchestrator.training.loss import row_class_counts

    assert row_class_counts(torch.tensor([1, -1, 0, 1, 1, -1], dtype=torch.int8)) == (3, 2)
    assert row_class_counts(torch.tensor([], dtype=torch.int8)) == (0, 0)
    with pytest.raises(ValueError, match="found 2 at target row 3"):
        row_class_counts(torch.tensor([1, 0, -1, 2], dtype=torch.int8))
