"""One training step: the forgetting loss vs Lethe's own SFT (and transformers' SFT), same batch.

    python benchmarks/train_bench.py                       # CPU, tiny Llama
    python benchmarks/train_bench.py --device cuda         # ~1B Llama shape, bf16, 4 x 2048
    python benchmarks/train_bench.py --device cuda --deepspeed --grad-ckpt

A step is forward + backward + optimizer step (torch AdamW; inside a DeepSpeed ZeRO-2
engine with --deepspeed). Three modes, same model and batch:
- "lethe_sft": what Lethe trains SFT and the reference with: TokenLossModel (decoder ->
  target rows -> chunked CE) + `forgetting_objective(mode="sft")`;
- "forget": the same module + `forgetting_objective(mode="forget")` (the paper's method);
- "hf_sft": transformers' own loss, `model(input_ids, labels=...).loss`, which materialises
  full-vocabulary logits (kept as a second line: it mixes the chunked-CE saving in).
So forget/lethe_sft is the objective's own cost. Each mode runs in its own child process
(peak memory = CUDA max allocated, or the process's max RSS on CPU); the modes run in
--rounds alternating rounds and each round gives a ratio, so the figures come with their
spread on a shared machine. Tokens/s counts every position of the batch; on CPU the step is
timed in process CPU time with one torch thread (--clock wall for wall time), because on a
shared machine wall time measures the neighbours. Last line:
`ratio forget/lethe_sft tokens_per_s <median over rounds>`. No Ray import.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import in_child  # noqa: E402

SHAPES = {
    # hidden, layers, heads, kv heads, ffn, vocab, tied
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=512, vocab_size=8192,
                 tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
               tie_word_embeddings=True),
}


def _batch(batch: int, seq: int, vocab: int, device, seed: int = 0):
    """Prompt = first 40 % of each row, response = the rest, 30 % of it class -1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    cls = torch.zeros(batch, seq, dtype=torch.int8)
    cls[:, int(0.4 * seq):] = 1
    noise = (torch.rand(batch, seq, generator=g) < 0.3) & (cls == 1)
    cls[noise] = -1
    from orchestrator.training.collate import collate

    b = collate(list(ids.numpy()), list(cls.numpy()), pad_id=0)
    b["sft_labels"] = torch.where(cls != 0, ids, torch.full_like(ids, -100))  # HF shifts itself
    return {k: v.to(device) for k, v in b.items()}


def _init_dist(device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)



def run_mode(mode: str, args: dict, out: mp.Queue) -> None:
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.method.objective import forgetting_objective
    from orchestrator.training.deepspeed_setup import fill_deepspeed_config, load_deepspeed_config
    from orchestrator.training.loss import TokenLossModel

    torch.manual_seed(0)
    if args["clock"] == "cpu":
        torch.set_num_threads(1)
    device = torch.device(args["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(**SHAPES[args["shape"]], max_position_embeddings=max(2048, args["seq"]),
                      attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if args["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args["deepspeed"]:
        model = model.to(dtype)  # plain torch rows: bf16 weights, no master copy (as the anchors)

    class SftModule(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, input_ids, attention_mask, labels):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              labels=labels).loss

    lethe = mode in ("forget", "lethe_sft")
    module = TokenLossModel(model, chunk_size=args["chunk"]) if lethe else SftModule(model)
    batch = _batch(args["batch"], args["seq"], cfg.vocab_size, device)
    opt = torch.optim.AdamW([p for p in module.parameters()], lr=1e-5,
                            fused=device.type == "cuda")
    engine = None
    if args["deepspeed"]:
        import deepspeed

        _init_dist(device)
        ds = fill_deepspeed_config(load_deepspeed_config("configs/deepspeed/zero2.json"),
                                   micro=args["batch"], gas=1, world=1, max_grad_norm=1.0,
                                   dtype=dtype)
        engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds,
                                                 dist_init_required=False)

    def step() -> None:
        call = engine if engine is not None else module
        if lethe:
            ce, c = call(batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch["target_class"])
            objective = "forget" if mode == "forget" else "sft"
            loss = forgetting_objective(ce, c, mode=objective, lam=0.1).loss
        else:
            loss = call(batch["input_ids"], batch["attention_mask"], batch["sft_labels"])
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # On CPU the clock is this process's CPU time with one torch thread: on a shared machine
    # wall time mostly measures the other processes, CPU time the step's own work.
    clock = time.process_time if args["clock"] == "cpu" else time.perf_counter
    times = []
    for _ in range(args["steps"]):
        t = clock()
        step()
        sync()
        times.append(clock() - t)
    times.sort()
    median = times[len(times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    out.put({"mode": mode, "step_s": median,
             "tokens_per_s": args["batch"] * args["seq"] / median, "peak_gib": peak})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: tiny on cpu, 1b on cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default: 256 on cpu, 2048 on cuda")
    p.add_argument("--chunk", type=int, default=4096, help="CE chunk rows (forget mode)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--deepspeed", action="store_true", help="inside a DeepSpeed ZeRO-2 engine")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three modes")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="step timer; default: cpu (process CPU time, 1 thread) on cpu, wall on cuda")
    a = p.parse_args()
    cuda = a.device == "cuda"
    args = {"device": a.device, "shape": a.shape or ("1b" if cuda else "tiny"), "batch": a.batch,
            "seq": a.seq or (2048 if cuda else 256), "chunk": a.chunk,
            "steps": a.steps or (10 if cuda else 5), "warmup": a.warmup,
            "grad_ckpt": a.grad_ckpt, "deepspeed": a.deepspeed,
            "clock": a.clock or ("wall" if cuda else "cpu")}
    if a.deepspeed and not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print("config", json.dumps(args))
    modes = ("hf_sft", "lethe_sft", "forget")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.rounds):  # a fresh process per mode: its own peak memory
        # Rotate the order each round: a slow period of the shared machine hits every mode.
        for mode in modes[r % 3:] + modes[: r % 3]:
            runs[mode].append(in_child(run_mode, mode, args, what=f"{mode} step"))
    for mode in modes:
        tps = sorted(x["tokens_per_s"] for x in runs[mode])
        best = max(runs[mode], key=lambda x: x["tokens_per_s"])
        print(f"{mode:9s} step {best['step_s'] * 1e3:9.1f} ms  tokens/s {tps[len(tps) // 2]:10.0f} "
              f"(range {tps[0]:.0f}-{tps[-1]:.0f})  peak {best['peak_gib']:.2f} GiB")

    def ratios(num: str, den: str, key: str = "tokens_per_s") -> list[float]:
        return sorted(x[key] / y[key] for x, y in zip(runs[num], runs[den], strict=True))

    def line(num: str, den: str, key: str) -> tuple[str, str]:
        rs = ratios(num, den, key)
        return f"{rs[len(rs) // 2]:.3f}", f"(range {rs[0]:.3f}-{rs[-1]:.3f} over {len(rs)} rounds)"

    for num, den, key, name in (("forget", "lethe_sft", "peak_gib", "peak_memory"),
                                ("lethe_sft", "hf_sft", "tokens_per_s", "tokens_per_s"),
                                ("forget", "hf_sft", "tokens_per_s", "tokens_per_s")):
        value, spread = line(num, den, key)
        print(f"ratio {num}/{den} {name} {value}  {spread}")
    value, spread = line("forget", "lethe_sft", "tokens_per_s")
    print(f"# forget/lethe_sft tokens_per_s {spread}")
    print(f"ratio forget/lethe_sft tokens_per_s {value}")


if __name__ == "__main__":
    main()
