"""The first GPU run, checked in one script (<= 10 min on one H100; no Ray needed or imported).

    python benchmarks/gpu_check.py --out gpu_check.json             # one GPU, bf16, real shapes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.json  # CPU, tiny shapes (the tests)

Sections: chunked_ce (chunked vs unfused CE at LLaMA-3 scale, bf16: memory, differences),
scorer (TokenScorer vs the naive padded path on two LLaMA-3.2-1B-shaped models), train_zero3
and train_zero2 (`run_training_local`: forget, LoRA r64, bf16, gradient checkpointing, 3
steps, checkpointed layer calls counted), all_reduce (the step sums through
orchestrator.training.distributed in a 1-rank NCCL group). docs/GPU.md has the details and
how to carry the wheels. Each section writes its figures into the JSON as soon as it ends;
a failing one records its error and the others still run (exit code 1). The dry run uses
the same functions with tiny shapes on CPU (gloo instead of NCCL).
Last line: `ratio scorer/naive tokens_per_s X`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # LLaMA-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocab 128256, tied.
    "full": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
             "tie_word_embeddings": True, "max_position_embeddings": 4096},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000,
             "tie_word_embeddings": True, "max_position_embeddings": 256},
}
# Per mode: rows/hidden/vocab of the CE check; scorer samples, lengths and budgets; training.
SIZES = {
    "full": {"ce_rows": 8 * 2048, "ce_chunk": 4096, "samples": 1200, "median": 350,
             "max_len": 2048, "min_len": 20, "budget": 16384, "score_chunk": 8192,
             "score_batch": 256, "train_rows": 16, "train_len": (1024, 2048), "micro": 4},
    "tiny": {"ce_rows": 300, "ce_chunk": 128, "samples": 24, "median": 24, "max_len": 96,
             "min_len": 4, "budget": 512, "score_chunk": 64, "score_batch": 16,
             "train_rows": 8, "train_len": (16, 48), "micro": 2},
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> int:
    import torch

    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gib(device, base: int) -> float | None:
    import torch

    if device.type != "cuda":
        return None  # no allocator statistics on CPU
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ chunked CE


def check_chunked_ce(device, mode: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from orchestrator.method.token_loss import chunked_token_ce

    shape, size = SHAPES[mode], SIZES[mode]
    n, h_dim, vocab, chunk = size["ce_rows"], shape["hidden_size"], shape["vocab_size"], size["ce_chunk"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h_dim, generator=g).to(device, torch.bfloat16)
    weight = (torch.randn(vocab, h_dim, generator=g) * 0.02).to(device, torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100  # prompt rows
    targets = targets.to(device)

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        base = _peak_reset(device)
        t0 = time.perf_counter()
        ce = fn(h, w)
        ce.sum().backward()
        _sync(device)
        seconds = time.perf_counter() - t0
        return ce.detach().float(), h.grad.float(), w.grad.float(), _peak_gib(device, base), seconds

    def unfused(h, w):
        logits = (h @ w.t()).float()  # what a model's lm_head + float() + CE does
        return F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)

    def chunked(h, w):
        return chunked_token_ce(h, w, targets, chunk_size=chunk)

    run(chunked)  # warm-up (kernels, the out_dtype probe)
    ce_c, gh_c, gw_c, mem_c, t_c = run(chunked)
    _free(device)
    ce_u, gh_u, gw_u, mem_u, t_u = run(unfused)
    _free(device)
    with torch.no_grad():  # fp32 reference, a chunk of rows at a time
        ref = torch.cat([F.cross_entropy(hidden[i:i + chunk].float() @ weight.float().t(),
                                         targets[i:i + chunk], reduction="none", ignore_index=-100)
                         for i in range(0, n, chunk)])

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    out = {
        "rows": n, "hidden": h_dim, "vocab": vocab, "chunk_size": chunk, "dtype": "bfloat16",
        "peak_gib_chunked": mem_c, "peak_gib_unfused": mem_u,
        "seconds_chunked": t_c, "seconds_unfused": t_u,
        "max_abs_diff_vs_unfused": float((ce_c - ce_u).abs().max()),
        "max_abs_diff_vs_fp32": float((ce_c - ref).abs().max()),
        "unfused_max_abs_diff_vs_fp32": float((ce_u - ref).abs().max()),
        "grad_hidden_max_rel_diff": rel(gh_c, gh_u),
        "grad_weight_max_rel_diff": rel(gw_c, gw_u),
    }
    out["ok"] = bool(out["max_abs_diff_vs_fp32"] < 0.05 and math.isfinite(out["grad_weight_max_rel_diff"]))
    print(f"chunked_ce: peak {mem_c} vs {mem_u} GiB, max |diff| vs unfused "
          f"{out['max_abs_diff_vs_unfused']:.4g}, vs fp32 {out['max_abs_diff_vs_fp32']:.4g}", flush=True)
    return out


# ---------------------------------------------------------------------------------- scorer


def _llama(device, mode: str, seed: int, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[mode], bos_token_id=0, eos_token_id=0, pad_token_id=1)
    with torch.device(device):  # weights are created on the GPU, never staged in host RAM
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _sft_lengths(mode: str) -> list[int]:
    import numpy as np

    size = SIZES[mode]
    rng = np.random.default_rng(0)
    raw = rng.lognormal(math.log(size["median"]), 0.9, size["samples"])
    return np.clip(raw, size["min_len"], size["max_len"]).astype(int).tolist()


def _naive_scores(model, rows, masks, device, batch: int = 6) -> list:
    """The paper's way: batches of 6 in data order, padded to the longest, fp32 logits."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    out = []
    with torch.inference_mode():
        for s in range(0, len(rows), batch):
            group = rows[s:s + batch]
            width = max(len(r) for r in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            att = torch.zeros(len(group), width, dtype=torch.long)
            for i, r in enumerate(group):
                ids[i, :len(r)] = torch.from_numpy(r)
                att[i, :len(r)] = 1
            ids, att = ids.to(device), att.to(device)
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none").view(len(group), width - 1).cpu().numpy()
            for i, r in enumerate(group):
                full = np.full(len(r), np.nan, dtype=np.float32)
                m = masks[s + i]
                pos = np.flatnonzero(m[1:] != 0) + 1
                full[pos] = ce[i, pos - 1]
                out.append(full)
            del logits
    return out


def check_scorer(device, mode: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from orchestrator.scoring.scorer import TokenScorer

    size = SIZES[mode]
    # CPU bf16 kernels are slow: the dry run scores in fp32 (same code, other dtype).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, ref = _llama(device, mode, 1, dtype), _llama(device, mode, 2, dtype)
    vocab = SHAPES[mode]["vocab_size"]
    rng = np.random.default_rng(1)
    lengths = _sft_lengths(mode)
    rows = [rng.integers(2, vocab, n).astype(np.int64) for n in lengths]
    masks = []
    for n in lengths:  # prompt = first 30 %, response = the rest
        m = np.zeros(n, dtype=np.int8)
        m[max(1, int(0.3 * n)):] = 1
        masks.append(m)
    scorer = TokenScorer.from_models(base, ref, token_budget=size["budget"],
                                     chunk_size=size["score_chunk"])
    step = size["score_batch"]

    def batch(s):
        obj = np.empty(len(rows[s:s + step]), dtype=object)
        objm = np.empty(len(obj), dtype=object)
        for i in range(len(obj)):
            obj[i], objm[i] = rows[s + i], masks[s + i]
        return {"sample_id": np.arange(s, s + len(obj)), "input_ids": obj, "response_mask": objm}

    scorer(batch(0))  # warm-up
    _naive_scores(base, rows[:6], masks[:6], device)
    mem0 = _peak_reset(device)
    t0 = time.perf_counter()
    lethe = {"base": [], "ref": []}
    for s in range(0, len(rows), step):
        out = scorer(batch(s))
        lethe["base"].extend(out["base_loss"])
        lethe["ref"].extend(out["ref_loss"])
    _sync(device)
    t_lethe = time.perf_counter() - t0
    mem_lethe = _peak_gib(device, mem0)
    _free(device)
    mem0 = _peak_reset(device)
    t0 = time.perf_counter()
    naive = {"base": _naive_scores(base, rows, masks, device),
             "ref": _naive_scores(ref, rows, masks, device)}
    _sync(device)
    t_naive = time.perf_counter() - t0
    mem_naive = _peak_gib(device, mem0)
    diffs = np.concatenate([np.abs(a - b)[~np.isnan(b)] for k in naive
                            for a, b in zip(lethe[k], naive[k], strict=True)])
    real = int(sum(lengths))
    padded_naive = sum(len(rows[s:s + 6]) * max(lengths[s:s + 6])
                       for s in range(0, len(rows), 6))
    out = {
        "samples": len(rows), "real_tokens": real, "median_length": float(np.median(lengths)),
        "token_budget": size["budget"], "chunk_size": size["score_chunk"], "dtype": str(dtype),
        "attn_implementation": "sdpa",
        "lethe_tokens_per_s": 2 * real / t_lethe, "naive_tokens_per_s": 2 * real / t_naive,
        "lethe_seconds": t_lethe, "naive_seconds": t_naive,
        "lethe_padding_fraction": scorer.counters.padding_fraction,
        "naive_padding_fraction": 1 - real / padded_naive,
        "peak_gib_lethe": mem_lethe, "peak_gib_naive": mem_naive,
        "max_abs_diff": float(diffs.max()), "mean_abs_diff": float(diffs.mean()),
        "compared_tokens": int(diffs.size),
    }
    out["speedup"] = out["lethe_tokens_per_s"] / out["naive_tokens_per_s"]
    out["ok"] = bool(np.isfinite(diffs).all() and out["mean_abs_diff"] < 0.05)
    print(f"scorer: {out['lethe_tokens_per_s']:.0f} vs naive {out['naive_tokens_per_s']:.0f} "
          f"tokens/s (x{out['speedup']:.2f}), mean |diff| {out['mean_abs_diff']:.4g}", flush=True)
    del scorer, base, ref
    _free(device)
    return out


# -------------------------------------------------------------------------------- training


def _make_base(workdir: Path, device, mode: str) -> str:
    """A random LLaMA-shaped model + a small trained tokenizer, saved as an HF folder."""
    import torch

    from orchestrator.models.tokenizer import train_tokenizer

    out = workdir / "base"
    if (out / "config.json").is_file():
        return str(out)
    model = _llama(device, mode, 0, torch.bfloat16)
    model.save_pretrained(str(out))
    texts = [f"sample {i} of the gpu check, token {i * 7 % 13}" for i in range(200)]
    train_tokenizer(texts, 300, out, family="llama")
    del model
    _free(device)
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
    mem0 = _peak_reset(device)
    t0 = time.perf_counter()
    try:
        result = run_training_local(job)
    finally:
        hf_modeling.checkpoint = real_checkpoint
    seconds = time.perf_counter() - t0
    m = result.metrics
    export = Path(result.export_dir)
    out = {
        "zero_stage": m.get("zero_stage"), "engine": m.get("engine"), "steps": result.steps,
        "checkpoint_calls": calls["n"], "layers": SHAPES[mode]["num_hidden_layers"],
        "pos_loss": m.get("pos_loss"), "neg_loss": m.get("neg_loss"),
        "mean_tokens_per_s": m.get("mean_tokens_per_s"), "seconds_total": seconds,
        "peak_gib": _peak_gib(device, mem0),
        "exported": (export / "model.safetensors").is_file() or any(export.glob("*.safetensors")),
        "lora_r": 64, "dtype": "bfloat16", "micro_batch_size": SIZES[mode]["micro"],
    }
    finite = all(isinstance(out[k], float) and math.isfinite(out[k]) for k in ("pos_loss", "neg_loss"))
    out["ok"] = bool(result.steps == 3 and calls["n"] > 0 and finite and out["exported"]
                     and out["zero_stage"] == stage)
    print(f"train zero{stage}: {result.steps} steps, {calls['n']} checkpointed layer calls, "
          f"peak {out['peak_gib']} GiB, {seconds:.1f} s", flush=True)
    _free(device)
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


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (what the tests run)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    mode = "tiny" if args.dry_run else "full"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device visible: run with --dry-run on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report: dict[str, Any] = {"dry_run": args.dry_run, "mode": mode, "device": str(device),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "versions": _versions(), "sections": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="lethe-gpu-check-")
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    sections = {
        "chunked_ce": lambda: check_chunked_ce(device, mode),
        "scorer": lambda: check_scorer(device, mode),
        "train_zero3": lambda: check_training(device, mode, 3, workdir),
        "train_zero2": lambda: check_training(device, mode, 2, workdir),
        "all_reduce": lambda: check_all_reduce(device),
    }
    try:
        for name, fn in sections.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - record and go on with the next section
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:]}
                print(f"{name}: FAILED {result['error']}", flush=True)
                _free(device)
            result["section_seconds"] = time.perf_counter() - t0
            report["sections"][name] = result
            _write(out_path, report, started)
    finally:
        tmp.cleanup()
    report = _write(out_path, report, started)
    print(f"wrote {out_path} in {report['seconds']:.0f} s; ok={report['ok']}")
    scorer = report["sections"].get("scorer", {})
    if "speedup" in scorer:
        print(f"ratio scorer/naive tokens_per_s {scorer['speedup']:.3f}")
    return 0 if report["ok"] else 1


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "deepspeed", "peft", "pydantic", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    import torch

    out["cuda"] = torch.version.cuda
    return out


def _write(path: Path, report: dict[str, Any], started: float) -> dict[str, Any]:
    report["seconds"] = time.perf_counter() - started
    report["ok"] = bool(report["sections"]) and all(s.get("ok") for s in report["sections"].values())
    ray = sys.modules.get("ray")
    report["ray_imported"] = ray is not None
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)
    return report


if __name__ == "__main__":
    sys.exit(main())
