"""gpu_check's training sections: train_zero3 / train_zero2 (`run_training_local`: forget,
LoRA r64, bf16, gradient checkpointing, 3 steps) and all_reduce (the step sums through
orchestrator.training.distributed in a 1-rank group)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

from gpu_check_ops import SHAPES, SIZES, free, llama, peak_gib, peak_reset

# -------------------------------------------------------------------------------- training


def _make_base(workdir: Path, device, mode: str) -> str:
    """A random LLaMA-shaped model + a small trained tokenizer, saved as an HF folder."""
    import torch

    from orchestrator.models.tokenizer import train_tokenizer

    out = workdir / "base"
    if (out / "config.json").is_file():
        return str(out)
    model = llama(device, mode, 0, torch.bfloat16)
    model.save_pretrained(str(out))
    texts = [f"sample {i} of the gpu check, token {i * 7 % 13}" for i in range(200)]
    train_tokenizer(texts, 300, out, family="llama")
    del model
    free(device)
    return str(out)


def _make_corpus(workdir: Path, mode: str) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    size, vocab = SIZES[mode], SHAPES[mode]["vocab_size"]
    rng = np.random.default_rng(2)
    cols: dict[str, list] = {"sample_id": [], "input_ids": [], "response_mask": [], "token_class": []}
    for i in range(size["train_rows"]):
        n = int(rng.integers(*size["train_len"]))
        ids = rng.integers(2, vocab, n).astype(np.int32)
        resp = np.zeros(n, dtype=np.int8)
        resp[int(0.3 * n):] = 1
        cls = np.where((rng.random(n) < 0.25) & (resp == 1), -1, resp).astype(np.int8)
        for k, v in (("sample_id", i), ("input_ids", ids.tolist()),
                     ("response_mask", resp.tolist()), ("token_class", cls.tolist())):
            cols[k].append(v)
    schema = pa.schema([("sample_id", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                        ("response_mask", pa.list_(pa.int8())), ("token_class", pa.list_(pa.int8()))])
    path = workdir / "corpus.parquet"
    pq.write_table(pa.Table.from_pydict(cols, schema=schema), path)
    return path


def check_training(device, mode: str, stage: int, workdir: Path) -> dict[str, Any]:
    import transformers.modeling_utils as hf_modeling

    from orchestrator.config import ModelSpec, TrainConfig
    from orchestrator.training import TrainJob, run_training_local

    base = _make_base(workdir, device, mode)
    data = _make_corpus(workdir, mode)
    name = f"zero{stage}"
    train = TrainConfig.model_validate({
        "lr": 1e-4, "micro_batch_size": SIZES[mode]["micro"], "grad_accum_steps": 1,
        "max_steps": 3, "warmup_ratio": 0.0, "seed": 0, "num_workers": 1,
        "use_gpu": device.type == "cuda", "gpus_per_worker": 1.0 if device.type == "cuda" else 0.0,
        "deepspeed": f"configs/deepspeed/zero{stage}.json", "dtype": "bfloat16",
        "gradient_checkpointing": True, "loss_chunk_size": 4096,
        "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
    })
    spec = ModelSpec(name="gpu-check", family="llama", pretrained=base)
    job = TrainJob(train_path=str(data), base_model_path=base, model=spec, train=train,
                   method="forget", output_dir=str(workdir / name / "out"), run_name=name,
                   storage_path=str(workdir / name / "ckpt"))
    calls = {"n": 0}
    real_checkpoint = hf_modeling.checkpoint

    def counting(fn, *args, **kwargs):  # HF binds this name at gradient_checkpointing_enable
        calls["n"] += 1
        return real_checkpoint(fn, *args, **kwargs)

    hf_modeling.checkpoint = counting
    mem0 = peak_reset(device)
    t0 = time.perf_counter()
    try:
        result = run_training_local(job)
    finally:
        hf_modeling.checkpoint = real_checkpoint
    seconds = time.perf_counter() - t0
    m = result.metrics
    ran = job.train_config()
    export = Path(result.export_dir)
    out = {
        "zero_stage": m.get("zero_stage"), "engine": m.get("engine"), "steps": result.steps,
        "checkpoint_calls": calls["n"], "layers": SHAPES[mode]["num_hidden_layers"],
        "pos_loss": m.get("pos_loss"), "neg_loss": m.get("neg_loss"),
        "mean_tokens_per_s": m.get("mean_tokens_per_s"), "seconds_total": seconds,
        "peak_gib": peak_gib(device, mem0),
        "exported": (export / "model.safetensors").is_file() or any(export.glob("*.safetensors")),
        # what the job ran with, read back from it (not restated here)
        "lora_r": ran.lora.r if ran.lora else None, "dtype": ran.dtype,
        "micro_batch_size": ran.micro_batch_size,
    }
    finite = all(isinstance(out[k], float) and math.isfinite(out[k]) for k in ("pos_loss", "neg_loss"))
    out["ok"] = bool(result.steps == 3 and calls["n"] > 0 and finite and out["exported"]
                     and out["zero_stage"] == stage)
    print(f"train zero{stage}: {result.steps} steps, {calls['n']} checkpointed layer calls, "
          f"peak {out['peak_gib']} GiB, {seconds:.1f} s", flush=True)
    free(device)
    return out


# ------------------------------------------------------------------------------ all-reduce


@dataclasses.dataclass
class StepSums:
    """What the loop sums over ranks at a report: CE sums and counts per class, tokens."""

    pos_ce: float = 12.5
    n_pos: int = 1000
    neg_ce: float = 3.25
    n_neg: int = 300
    tokens: int = 8192


def check_all_reduce(device) -> dict[str, Any]:
    import socket

    import torch
    import torch.distributed as dist

    from orchestrator.training import distributed

    def init(backend: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=0, world_size=1)

    out: dict[str, Any] = {}
    backends = ["nccl", "cpu:gloo,cuda:nccl"] if device.type == "cuda" else ["gloo"]
    ok = True
    for backend in backends:
        if dist.is_initialized():
            dist.destroy_process_group()
        init(backend)
        try:
            sums = StepSums()
            t0 = time.perf_counter()
            reduced = distributed.all_reduce_sums(sums)
            seconds = time.perf_counter() - t0
            host = torch.tensor([3.0, 1.0], dtype=torch.float64)
            where = distributed.collective_device(distributed.backend_string(), host.device)
            distributed.all_reduce(host, op=dist.ReduceOp.MAX)
            distributed.barrier(long_wait=True)
            out[backend] = {"backend_config": distributed.backend_string(),
                            "host_tensor_reduced_on": str(where), "seconds": seconds,
                            "matches": reduced == sums and host.tolist() == [3.0, 1.0]}
            ok = ok and out[backend]["matches"]
        finally:
            distributed.forget_groups()
            dist.destroy_process_group()
    out["matches"] = ok
    out["ok"] = ok
    print(f"all_reduce: {', '.join(f'{b}: {v}' for b, v in out.items() if isinstance(v, dict))}",
          flush=True)
    return out
