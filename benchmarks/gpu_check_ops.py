"""gpu_check's shapes and sizes, device helpers, and its kernel sections: chunked_ce
(chunked vs unfused CE) and scorer (TokenScorer vs the naive padded path).

Every compared tensor has a tolerance on its largest and its mean difference; a section is
ok only when all of them hold (a NaN fails). The tolerances are written into the JSON and
printed beside the measured differences.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

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

# Tolerances. chunked_ce (bf16 inputs): CE per row in nats; gradients relative to the
# reference's own size (max |diff| / max |ref|, mean |diff| / mean |ref|). bf16 noise measured
# on CPU (hidden 2048, vocab 32000, 512 rows; and the tiny shapes): CE vs fp32 max 0.007 /
# mean 0.001 nats, gradients max-relative <= 0.0063 and mean-relative <= 0.0021, chunked and
# unfused alike. A gradient 3 % off (or one chunk's rows missing) fails the mean bound.
CE_TOLERANCES = {
    "ce": {"max": 0.05, "mean": 0.01},
    "grad_hidden": {"max": 0.02, "mean": 0.01},
    "grad_weight": {"max": 0.02, "mean": 0.01},
}
# scorer: per-token loss (nats) of TokenScorer vs the naive padded path, same model. Measured
# in bf16 on CPU (hidden 512, 4 layers, vocab 32000): max 0.0054, mean 6e-5; fp32 (the dry
# run): max 1e-6. Scoring each row's losses one position off gives mean 0.18 / max 1.2
# (tiny shapes) and 0.50 / 2.4 (hidden 512), far outside. Per scoring dtype (the dry run
# scores in float32).
SCORER_TOLERANCES = {"bfloat16": {"max": 0.1, "mean": 0.01},
                     "float32": {"max": 1e-3, "mean": 1e-4}}


def compare(name: str, got, want, tol: dict[str, float], relative: bool = False) -> dict[str, Any]:
    """Max and mean |got - want| (relative: divided by max / mean |want|) against `tol`;
    printed on one line. Non-finite differences fail (NaN <= tol is false)."""
    import torch

    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    diff = (got - want).abs()
    big = float(diff.max()) if diff.numel() else 0.0
    mean = float(diff.mean()) if diff.numel() else 0.0
    if relative:
        big /= max(float(want.abs().max()), 1e-30)
        mean /= max(float(want.abs().mean()), 1e-30)
    ok = bool(big <= tol["max"] and mean <= tol["mean"])
    kind = "relative " if relative else ""
    print(f"  {name}: {kind}max |diff| {big:.3g} (tol {tol['max']:g}), mean {mean:.3g} "
          f"(tol {tol['mean']:g}) {'ok' if ok else 'FAILED'}", flush=True)
    return {"max": big, "max_tol": tol["max"], "mean": mean, "mean_tol": tol["mean"],
            "relative": relative, "ok": ok}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device) -> int:
    import torch

    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_gib(device, base: int) -> float | None:
    import torch

    if device.type != "cuda":
        return None  # no allocator statistics on CPU
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def free(device) -> None:
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
        base = peak_reset(device)
        t0 = time.perf_counter()
        ce = fn(h, w)
        ce.sum().backward()
        sync(device)
        seconds = time.perf_counter() - t0
        return ce.detach().float(), h.grad.float(), w.grad.float(), peak_gib(device, base), seconds

    def unfused(h, w):
        logits = (h @ w.t()).float()  # what a model's lm_head + float() + CE does
        return F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)

    def chunked(h, w):
        return chunked_token_ce(h, w, targets, chunk_size=chunk)

    run(chunked)  # warm-up (kernels, the out_dtype probe)
    ce_c, gh_c, gw_c, mem_c, t_c = run(chunked)
    free(device)
    ce_u, gh_u, gw_u, mem_u, t_u = run(unfused)
    free(device)
    ce_r, gh_r, gw_r = _fp32_reference(hidden, weight, targets, chunk)
    valid = targets != -100
    print(f"chunked_ce: peak {mem_c} vs {mem_u} GiB, {t_c:.3f} vs {t_u:.3f} s", flush=True)
    tol = CE_TOLERANCES
    checks = {  # the path under test against the fp32 reference and the unfused bf16 path
        "ce_vs_fp32": compare("CE vs fp32", ce_c[valid], ce_r[valid], tol["ce"]),
        "ce_vs_unfused": compare("CE vs unfused", ce_c[valid], ce_u[valid], tol["ce"]),
        "grad_hidden_vs_fp32": compare("grad hidden vs fp32", gh_c, gh_r, tol["grad_hidden"], True),
        "grad_hidden_vs_unfused": compare("grad hidden vs unfused", gh_c, gh_u,
                                          tol["grad_hidden"], True),
        "grad_weight_vs_fp32": compare("grad weight vs fp32", gw_c, gw_r, tol["grad_weight"], True),
        "grad_weight_vs_unfused": compare("grad weight vs unfused", gw_c, gw_u,
                                          tol["grad_weight"], True),
    }
    # The unfused bf16 path against fp32: the noise floor the tolerances sit above (no verdict).
    floor = {"ce": float((ce_u - ce_r)[valid].abs().max()),
             "grad_hidden": float((gh_u - gh_r).abs().max() / gh_r.abs().max()),
             "grad_weight": float((gw_u - gw_r).abs().max() / gw_r.abs().max())}
    out = {
        "rows": n, "hidden": h_dim, "vocab": vocab, "chunk_size": chunk, "dtype": "bfloat16",
        "peak_gib_chunked": mem_c, "peak_gib_unfused": mem_u,
        "seconds_chunked": t_c, "seconds_unfused": t_u,
        "checks": checks, "unfused_vs_fp32_max": floor,
        "max_abs_diff_vs_unfused": checks["ce_vs_unfused"]["max"],
        "max_abs_diff_vs_fp32": checks["ce_vs_fp32"]["max"],
        "failed": sorted(k for k, c in checks.items() if not c["ok"]),
    }
    out["ok"] = not out["failed"]
    return out


def _fp32_reference(hidden, weight, targets, chunk: int):
    """CE per row and both gradients in fp32 (TF32 off), a chunk of rows at a time, through
    torch's own cross_entropy: nothing of chunked_token_ce is in the reference."""
    import torch
    import torch.nn.functional as F

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        h = hidden.float().requires_grad_(True)
        w = weight.float().requires_grad_(True)
        ces = []
        for i in range(0, h.shape[0], chunk):  # each backward adds into h.grad and w.grad
            ce = F.cross_entropy(h[i:i + chunk] @ w.t(), targets[i:i + chunk], reduction="none",
                                 ignore_index=-100)
            ce.sum().backward()
            ces.append(ce.detach())
        return torch.cat(ces), h.grad, w.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ---------------------------------------------------------------------------------- scorer


def llama(device, mode: str, seed: int, dtype):
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
    base, ref = llama(device, mode, 1, dtype), llama(device, mode, 2, dtype)
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
    mem0 = peak_reset(device)
    t0 = time.perf_counter()
    lethe = {"base": [], "ref": []}
    for s in range(0, len(rows), step):
        out = scorer(batch(s))
        lethe["base"].extend(out["base_loss"])
        lethe["ref"].extend(out["ref_loss"])
    sync(device)
    t_lethe = time.perf_counter() - t0
    mem_lethe = peak_gib(device, mem0)
    free(device)
    mem0 = peak_reset(device)
    t0 = time.perf_counter()
    naive = {"base": _naive_scores(base, rows, masks, device),
             "ref": _naive_scores(ref, rows, masks, device)}
    sync(device)
    t_naive = time.perf_counter() - t0
    mem_naive = peak_gib(device, mem0)
    print(f"scorer: {2 * sum(lengths) / t_lethe:.0f} vs naive {2 * sum(lengths) / t_naive:.0f} "
          "tokens/s", flush=True)
    checks = {}
    for k in naive:  # each model's per-token losses, where the naive path has one
        got = np.concatenate([a[~np.isnan(b)] for a, b in zip(lethe[k], naive[k], strict=True)])
        want = np.concatenate([b[~np.isnan(b)] for b in naive[k]])
        checks[f"{k}_loss"] = compare(f"{k} loss vs naive", got, want,
                                        SCORER_TOLERANCES[str(dtype).removeprefix("torch.")])
        checks[f"{k}_loss"]["compared_tokens"] = int(want.size)
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
        "checks": checks,
        "max_abs_diff": max(c["max"] for c in checks.values()),
        "mean_abs_diff": max(c["mean"] for c in checks.values()),
        "compared_tokens": sum(c["compared_tokens"] for c in checks.values()),
        "failed": sorted(k for k, c in checks.items() if not c["ok"]),
    }
    out["speedup"] = out["lethe_tokens_per_s"] / out["naive_tokens_per_s"]
    out["ok"] = not out["failed"]
    del scorer, base, ref
    free(device)
    return out
