"""Scoring throughput: Lethe's TokenScorer vs the paper's way, same models, same samples.

    python benchmarks/score_bench.py                 # CPU: tiny Llama, ~1-2 minutes
    python benchmarks/score_bench.py --device cuda   # ~1B Llama-shaped model, bf16, 1200 samples

Samples have "real SFT lengths": log-normal with median 350 and sigma 0.9, clipped to
20..2048 (PERFORMANCE.md); the first 10-50 % of each sample is prompt, the rest response.
Both paths score every sample with a base and a reference model:

- naive (the paper's way): batches of 6 in data order, padded to the longest with an
  attention mask, full fp32 logits, per-token F.cross_entropy;
- lethe: `TokenScorer` (length bucketing by token budget, no mask with right padding,
  chunked CE on response rows only).

Reports real tokens/s (sample tokens through both models per second; best of --repeats
alternating runs), the padded fraction of computed tokens, peak memory (CUDA
max_memory_allocated; RSS growth on CPU) and the max difference between the two paths' losses.

Second part (CPU, skipped with --ray-rows 0 or when Ray is not installed): the orchestration's
own cost. The same TokenScorer through the scoring stage (`run_scoring`: a Ray Data
pipeline, read_parquet -> map_batches on an actor pool whose actors load both models ->
write_parquet from the workers) vs the bare scorer in this process (models loaded from the
same folders, same Parquet input, calls of `batch_size` rows) on a corpus of --ray-rows rows
(default 20 000, demo-like lengths, the demo's 2-layer 64-wide model). Both use the
machine's cores: the bare scorer all torch threads, the stage one actor per core, with the
embedded instance's settings (`run_scoring(embedded=True)`). Wall time counts everything a user waits for (model
loads, actor start-up, reading, writing); Ray is started before the clock. The last line is
`ratio ray/bare tokens_per_s <x>`, or `ratio lethe/naive tokens_per_s <x>` without Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import PeakRss  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from orchestrator.scoring.scorer import ScoringCounters, TokenScorer  # noqa: E402

GPU_SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                 tie_word_embeddings=True)
CPU_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, vocab_size=8192,
                 tie_word_embeddings=True)


def make_samples(n: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(350), 0.9, n)), 20, 2048).astype(int)
    samples = []
    for i, length in enumerate(lengths):
        mask = np.zeros(length, np.int8)
        mask[int(length * rng.uniform(0.1, 0.5)):] = 1
        samples.append({"sample_id": i, "input_ids": rng.integers(0, vocab, length), "response_mask": mask})
    return samples


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=2048, **shape)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


class PeakMemory:
    """Peak CUDA allocation, or peak RSS growth (sampled every 5 ms) on CPU, inside `with`."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.rss = PeakRss(interval=0.005).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.rss.__exit__(*exc)
            self.peak = self.rss.peak - self.rss.start


@torch.inference_mode()
def naive_scores(models: dict, samples: list[dict], device: str, batch: int = 6):
    """The paper's way: data order, pad to the longest, full fp32 logits, per-token CE."""
    out = {name: [] for name in models}
    computed = 0
    for start in range(0, len(samples), batch):
        group = samples[start : start + batch]
        width = max(len(s["input_ids"]) for s in group)
        computed += width * len(group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        attn = torch.zeros(len(group), width, dtype=torch.long)
        for b, s in enumerate(group):
            ids[b, : len(s["input_ids"])] = torch.as_tensor(s["input_ids"])
            attn[b, : len(s["input_ids"])] = 1
        ids, attn = ids.to(device), attn.to(device)
        for name, model in models.items():
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none").view(len(group), width - 1).cpu().numpy()
            del logits
            for b, s in enumerate(group):
                loss = np.full(len(s["input_ids"]), np.nan, np.float32)
                keep = s["response_mask"][1:] == 1
                loss[1:][keep] = ce[b, : len(s["input_ids"]) - 1][keep]
                out[name].append(loss)
    return out, computed


def as_batch(samples: list[dict]) -> dict[str, np.ndarray]:
    col = lambda k: np.array([s[k] for s in samples] + [None], dtype=object)[:-1]  # noqa: E731
    return {"sample_id": np.array([s["sample_id"] for s in samples]), "input_ids": col("input_ids"),
            "response_mask": col("response_mask")}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compare_stage(rows: int, actors: int | None, repeats: int, seed: int) -> None:
    """The scoring stage (Ray actors, run_scoring) vs the bare TokenScorer, same input."""
    import shutil
    import tempfile

    import pyarrow.parquet as pq
    import ray
    from scale_bench import DEMO_MODEL, save_models, start_ray, write_tokens

    from orchestrator.config import ScoringConfig
    from orchestrator.scoring.stage import _table_to_batch, run_scoring

    cores = max(1, min(2, os.cpu_count() or 1))
    actors = actors or cores
    root = Path(tempfile.mkdtemp(prefix="score_bench_"))
    try:
        vocab = 1024
        tokens = write_tokens(root / "tokens.parquet", rows, vocab, (40, 160), seed)
        base, ref = save_models(root, DEMO_MODEL, vocab)
        cfg = ScoringConfig(num_actors=actors, batch_size=256, token_budget=8192, chunk_size=2048)
        real = int(pq.read_table(tokens, columns=["num_tokens"])["num_tokens"].to_numpy().sum())
        print(f"# stage vs bare: {rows} rows, {real} tokens, demo model {DEMO_MODEL}, "
              f"{actors} actor(s) x 1 CPU vs {cores} torch threads")
        start_ray(actors)
        best: dict[str, float] = {}
        timings = {}
        for rep in range(repeats):
            torch.set_num_threads(cores)
            t0 = time.perf_counter()
            scorer = TokenScorer(base, ref, device="cpu", token_budget=cfg.token_budget,
                                 chunk_size=cfg.chunk_size)
            table = pq.read_table(tokens, columns=["sample_id", "input_ids", "response_mask"])
            table = table.sort_by("sample_id")
            bare = {"base_loss": [], "ref_loss": []}
            for s0 in range(0, table.num_rows, cfg.batch_size):
                out = scorer(_table_to_batch(table.slice(s0, cfg.batch_size)))
                bare["base_loss"].extend(out["base_loss"])
                bare["ref_loss"].extend(out["ref_loss"])
            best["bare"] = min(best.get("bare", float("inf")), time.perf_counter() - t0)
            del scorer
            out_dir = root / f"scores-{rep}"
            t0 = time.perf_counter()
            run_scoring(tokens, base, ref, cfg, out_dir, embedded=True)
            dt = time.perf_counter() - t0
            if dt < best.get("ray", float("inf")):
                best["ray"] = dt
                timings = json.loads((out_dir / "_SUCCESS.json").read_text())["timings"]
                ray_stats = (out_dir / "_ray_data_stats.txt").read_text()
            scores = pq.read_table(out_dir).sort_by("sample_id")
            shutil.rmtree(out_dir)
        ray.shutdown()
        diff, equal = 0.0, 0
        for key in ("base_loss", "ref_loss"):
            for got, want in zip(scores[key].to_pylist(), bare[key], strict=True):
                got = np.asarray(got, dtype=np.float32)
                diff = max(diff, float(np.nanmax(np.abs(got - want), initial=0.0)))
                equal += int(np.array_equal(got, want, equal_nan=True))
        for name in ("bare", "ray"):
            print(f"{name:6s} {real / best[name]:12.0f} tokens/s (both models, wall incl. model "
                  f"loads)  {best[name]:.1f} s")
        print(f"# ray stage time split (s): {json.dumps(timings)}")
        print("# Ray Data's stats of the fastest stage run:\n" + "\n".join(
            f"#   {line}" for line in ray_stats.splitlines()))
        print(f"max |ray - bare| loss {diff:.2e}; rows bit-equal {equal}/{2 * rows}")
        print(f"ratio ray/bare tokens_per_s {best['bare'] / best['ray']:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--samples", type=int, default=None, help="default: 1200 on cuda, 96 on cpu")
    p.add_argument("--token-budget", type=int, default=16384)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--ray-batch", type=int, default=256, help="rows per TokenScorer call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per path; best kept")
    p.add_argument("--ray-rows", type=int, default=20000, help="rows for the stage vs bare part (0: skip)")
    p.add_argument("--ray-actors", type=int, default=None, help="default: one per core (max 2)")
    args = p.parse_args()
    device = args.device
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = args.samples or (1200 if device == "cuda" else 96)
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    samples = make_samples(n, shape["vocab_size"], args.seed)
    lengths = np.array([len(s["input_ids"]) for s in samples])
    real = int(lengths.sum())
    print(f"device {device}, {n} samples, {real} tokens (median {int(np.median(lengths))}, "
          f"p95 {int(np.percentile(lengths, 95))}), model {shape}, dtype {dtype}")
    models = {"base": build_model(shape, device, dtype, 0), "ref": build_model(shape, device, dtype, 1)}
    scorer = TokenScorer.from_models(models["base"], models["ref"], token_budget=args.token_budget,
                                     chunk_size=args.chunk_size)
    warm = samples[:6]  # kernels, allocator and threads warmed for both paths
    naive_scores(models, warm, device)
    scorer(as_batch(warm))
    scorer.counters = ScoringCounters()

    # Alternate the two paths and keep each one's best run: the machine may be shared, and
    # interleaving exposes both to the same background load.
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            naive, computed = naive_scores(models, samples, device)
            sync(device)
            dt = time.perf_counter() - t0
        if "naive" not in best or dt < best["naive"][3]:
            best["naive"] = (real / dt, 1 - real / computed, mem.peak, dt)

        scorer.counters = ScoringCounters()
        lethe = {"base": [], "ref": []}
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            for start in range(0, n, args.ray_batch):
                out = scorer(as_batch(samples[start : start + args.ray_batch]))
                lethe["base"].extend(out["base_loss"])
                lethe["ref"].extend(out["ref_loss"])
            sync(device)
            dt = time.perf_counter() - t0
        if "lethe" not in best or dt < best["lethe"][3]:
            best["lethe"] = (real / dt, scorer.counters.padding_fraction, mem.peak, dt)
    results = best

    diff = max(float(np.nanmax(np.abs(a - b), initial=0.0))
               for name in lethe for a, b in zip(lethe[name], naive[name], strict=True))
    nan_same = all(np.array_equal(np.isnan(a), np.isnan(b))
                   for name in lethe for a, b in zip(lethe[name], naive[name], strict=True))
    mem_name = "peak GPU memory allocated" if device == "cuda" else "peak RSS growth"
    for name, (tps, pad, peak, dt) in results.items():
        print(f"{name:6s} {tps:12.0f} tokens/s (both models)  padding {100 * pad:5.1f} %  "
              f"{mem_name} {peak / 2**30:7.3f} GiB  ({dt:.1f} s)")
    print(f"max |lethe - naive| loss {diff:.2e}; NaN positions identical: {nan_same}")
    print(f"ratio lethe/naive peak_memory {results['lethe'][2] / max(results['naive'][2], 1):.3f}")
    print(f"ratio lethe/naive tokens_per_s {results['lethe'][0] / results['naive'][0]:.3f}")
    if device == "cpu" and args.ray_rows > 0:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("# Ray is not installed: the stage comparison is skipped")
            return
        compare_stage(args.ray_rows, args.ray_actors, args.repeats, args.seed)


if __name__ == "__main__":
    main()
