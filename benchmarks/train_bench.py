"""One training step, forgetting loss vs plain SFT (the model's own loss), same model and batch.

    python benchmarks/train_bench.py                       # CPU, tiny Llama
    python benchmarks/train_bench.py --device cuda         # ~1B Llama shape, bf16, 4 x 2048
    python benchmarks/train_bench.py --device cuda --deepspeed --grad-ckpt

A step is forward + backward + optimizer step (torch AdamW; inside a DeepSpeed ZeRO-2
engine with --deepspeed). "sft" is `model(input_ids, labels=...).loss`, which materialises
full-vocabulary logits; "forget" is Lethe's TokenLossModel (decoder -> target rows ->
chunked CE) + `forgetting_objective`. Each mode runs in its own child process so that peak
memory (CUDA max allocated, or the process's max RSS on CPU) is its own. Tokens/s counts
every position of the batch. Last line: `ratio forget/sft tokens_per_s <x>`.
No Ray import.
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

    module = TokenLossModel(model, chunk_size=args["chunk"]) if mode == "forget" else SftModule(model)
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
        if mode == "forget":
            ce, c = call(batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch["target_class"])
            loss = forgetting_objective(ce, c, mode="forget", lam=0.1).loss
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
    times = []
    for _ in range(args["steps"]):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
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
    a = p.parse_args()
    cuda = a.device == "cuda"
    args = {"device": a.device, "shape": a.shape or ("1b" if cuda else "tiny"), "batch": a.batch,
            "seq": a.seq or (2048 if cuda else 256), "chunk": a.chunk,
            "steps": a.steps or (10 if cuda else 5), "warmup": a.warmup,
            "grad_ckpt": a.grad_ckpt, "deepspeed": a.deepspeed}
    if a.deepspeed and not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print("config", json.dumps(args))
    ctx = mp.get_context("spawn")  # a fresh process per mode: its own peak memory
    results = {}
    for mode in ("sft", "forget"):
        q = ctx.Queue()
        proc = ctx.Process(target=run_mode, args=(mode, args, q))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{mode} step failed (exit code {proc.exitcode})")
        results[mode] = q.get()
        r = results[mode]
        print(f"{mode:7s} step {r['step_s'] * 1e3:9.1f} ms  tokens/s {r['tokens_per_s']:10.0f}  "
              f"peak {r['peak_gib']:.2f} GiB")
    ratio = results["forget"]["tokens_per_s"] / results["sft"]["tokens_per_s"]
    print(f"ratio forget/sft peak_memory {results['forget']['peak_gib'] / results['sft']['peak_gib']:.3f}")
    print(f"ratio forget/sft tokens_per_s {ratio:.3f}")


if __name__ == "__main__":
    main()
