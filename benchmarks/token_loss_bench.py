"""Chunked per-token CE vs the unfused (full logits) CE: forward + backward time and memory.

Unfused baseline = what a model's own loss does: logits = hidden @ W.T in full, fp32, then
F.cross_entropy(reduction="none"). Chunked = orchestrator.method.chunked_token_ce.
Peak memory is the peak of live allocator bytes above the starting point during one
forward + backward: on CPU from the profiler's allocation events, on CUDA from
torch.cuda.max_memory_allocated. Timing passes run without the profiler.

    .venv/bin/python benchmarks/token_loss_bench.py [--n 8192 --hidden 256 --vocab 32000]
        [--chunk 1024] [--device cuda] [--dtype bfloat16]

Last line: `ratio chunked/full peak_memory <x>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.method.token_loss import chunked_token_ce  # noqa: E402

IGNORE = -100


def unfused(hidden, weight, targets, chunk):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)


def chunked(hidden, weight, targets, chunk):
    return chunked_token_ce(hidden, weight, targets, chunk_size=chunk)


def step(fn, hidden, weight, targets, chunk) -> None:
    fn(hidden, weight, targets, chunk).sum().backward()


def clear_grads(hidden, weight, *_) -> None:
    # Outside the measured region: freeing old grads inside it would hide allocations.
    hidden.grad = None
    weight.grad = None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_extra_bytes(fn, args, device: str) -> int:
    clear_grads(*args)
    if device.startswith("cuda"):
        sync(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, *args)
        sync(device)
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, *args)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def best_time(fn, args, device: str, repeats: int) -> float:
    step(fn, *args)  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        clear_grads(*args)
        sync(device)
        t0 = time.perf_counter()
        step(fn, *args)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="rows (tokens)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after a warm-up")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hidden = torch.randn(args.n, args.hidden, device=args.device, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=args.device) * 0.05).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.n,), device=args.device)
    targets[::10] = IGNORE
    a = (hidden, weight, targets, args.chunk)

    # Correctness of this very problem, so the figures are for matching results.
    with torch.no_grad():
        diff = (chunked(*a) - unfused(*a)).abs().max().item()

    full_logits = args.n * args.vocab * 4
    print(f"# N={args.n} H={args.hidden} V={args.vocab} chunk={args.chunk} device={args.device} "
          f"dtype={args.dtype}; full fp32 logits = {full_logits / 2**20:.0f} MiB; "
          f"max |chunked - unfused| loss = {diff:.2e}")
    print(f"{'method':>8} {'fwd+bwd s':>10} {'peak extra MiB':>15}")
    results = {}
    for name, fn in (("full", unfused), ("chunked", chunked)):
        t = best_time(fn, a, args.device, args.repeats)
        mem = peak_extra_bytes(fn, a, args.device)
        results[name] = (t, mem)
        print(f"{name:>8} {t:>10.3f} {mem / 2**20:>15.1f}")
    (tf, mf), (tc, mc) = results["full"], results["chunked"]
    print(f"ratio chunked/full time {tc / tf:.3f}")
    print(f"ratio chunked/full peak_memory {mc / mf:.4f}")


if __name__ == "__main__":
    main()
