"""Effect study for the embedded default: does forgetting beat SFT on the synthetic tasks?

Ray-free and fast: the plain functions of every stage (generate_synthetic, materialize_base,
warm-up, prepare_dataset, run_training_local, TokenScorer, partition), and a direct scorer of
the held-out tasks (the same prompts and answers as the lm-eval tasks lethe_synth_mc /
lethe_synth_gen, without lm-eval's overhead). The pipeline's own numbers come from
`lethe run`; this script is the reproducible ablation behind the default's settings.

    nice -n 10 .venv/bin/python scripts/effect_study.py --families llama --seeds 0 1 2 \
        --warmup-steps 300 --ref clean --rho 0.7 --out /tmp/study/a.json

Each variant's stages are cached under --work by a hash of what determines them, so an
ablation over rho / lambda re-trains only the method runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.config import (  # noqa: E402
    DataConfig,
    ModelSpec,
    PartitionConfig,
    SyntheticConfig,
    TrainConfig,
    WarmupConfig,
)
from orchestrator.data import corpus_texts, generate_synthetic, prepare_dataset  # noqa: E402
from orchestrator.data.trusted import write_clean_rows  # noqa: E402
from orchestrator.method.partition import auroc  # noqa: E402
from orchestrator.models import load_model, load_tokenizer, materialize_base  # noqa: E402
from orchestrator.models.warmup import warm_up_base  # noqa: E402
from orchestrator.partition import run_partition  # noqa: E402
from orchestrator.scoring import TokenScorer  # noqa: E402
from orchestrator.training import SubsetSpec, TrainJob, run_training_local  # noqa: E402

EOS = "<|endoftext|>"
ANSWER_RE = re.compile(r"The answer is\s*(.+?)\.?\s*(?=\n|<\||$)")
FAMILY_SIZES = {
    "llama": {"num_kv_heads": 2},
    "qwen2": {"num_kv_heads": 2},
    "gpt_neo": {},
}


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _done(path: Path) -> bool:
    return (path / "_DONE").is_file()


def _mark(path: Path) -> None:
    (path / "_DONE").write_text("ok")


# ----------------------------------------------------------------------------- stages


def make_data(args: argparse.Namespace, work: Path) -> tuple[SyntheticConfig, Path]:
    synth = SyntheticConfig(num_train=args.num_train, num_eval=args.num_eval,
                            noise_fraction=args.noise_fraction, noise_kinds=args.noise_kinds,
                            tasks=args.tasks, seed=args.data_seed)
    out = work / "data" / _key(synth.model_dump())
    if not _done(out):
        generate_synthetic(synth, out)
        _mark(out)
    return synth, out


def make_spec(args: argparse.Namespace, family: str) -> ModelSpec:
    sizes = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
             "intermediate_size": args.hidden * (4 if family == "gpt_neo" else 2),
             **FAMILY_SIZES[family]}
    warm = (WarmupConfig(steps=args.warmup_steps, lr=args.warmup_lr, rows=args.warmup_rows,
                         batch_size=args.warmup_batch, tasks=args.warmup_tasks)
            if args.warmup_steps else None)
    return ModelSpec(name=f"tiny-{family}", family=family, from_config=sizes,
                     tokenizer_vocab_size=args.vocab, warmup=warm)


def make_base(spec: ModelSpec, synth: SyntheticConfig, data: Path, args, work: Path) -> Path:
    out = work / "base" / _key([spec.model_dump(), str(data), args.max_len])
    if not _done(out):
        materialize_base(spec, corpus_texts(str(data / "train.jsonl")), out / "model", seed=0)
        if spec.warmup is not None:
            rep = warm_up_base(spec, out / "model", synth, data, args.max_len)
            print(f"  warm-up {spec.family}: {rep['tokens_per_cpu_s']:.0f} tok/cpu-s, loss "
                  f"{rep['first_loss']:.2f} -> {rep['final_loss']:.2f} in {rep['cpu_seconds']:.1f} cpu-s",
                  flush=True)
        _mark(out)
    return out / "model"


def make_tokens(spec: ModelSpec, base: Path, data: Path, args, work: Path) -> Path:
    out = work / "tokens" / _key([str(base), args.max_len])
    if not _done(out):
        cfg = DataConfig(source="synthetic", max_seq_len=args.max_len)
        prepare_dataset(cfg, load_tokenizer(spec, str(base)), out, rows_path=str(data / "train.jsonl"))
        _mark(out)
    return out / "tokens.parquet"


def _train_dict(args, seed: int, lr: float, epochs: float) -> dict[str, Any]:
    return TrainConfig(lr=lr, epochs=epochs, micro_batch_size=args.micro, seed=seed,
                       warmup_ratio=0.05, num_workers=1, deepspeed=None,
                       **{"lambda": {"schedule": args.schedule, "t_max": args.lam,
                                     "t_min": 1e-5}}).model_dump(mode="json", by_alias=True)


def train(spec, base: Path, parquet: Path, method: str, train_cfg: dict, out: Path,
          subset: SubsetSpec | None = None) -> tuple[Path, float]:
    job = TrainJob(train_path=str(parquet), base_model_path=str(base), model=spec, train=train_cfg,
                   method=method, output_dir=str(out), run_name=out.name,
                   storage_path=str(out / "ray"),
                   class_column="response_mask" if method == "sft" else "token_class",
                   subset=subset)
    cpu = time.process_time()
    res = run_training_local(job)
    cpu = time.process_time() - cpu
    if not res.cached:
        (out / "cpu_seconds.txt").write_text(f"{cpu}")
    cpu_file = out / "cpu_seconds.txt"
    return Path(res.export_dir), float(cpu_file.read_text()) if cpu_file.is_file() else 0.0


def clean_subset(tokens: Path, out: Path) -> tuple[Path, int]:
    """The pool's rows without annotated noise (as reference.subset_source: clean), and the
    pool's size (the subset size is a fraction of the pool, as for the random subset)."""
    path = out / "clean_rows.parquet"
    _, n_pool = write_clean_rows(tokens, path)
    return path, n_pool


def make_reference(spec, base: Path, tokens: Path, data: Path, args, work: Path) -> Path:
    cfg = _train_dict(args, seed=0, lr=args.ref_lr or args.lr, epochs=args.ref_epochs or args.epochs)
    out = work / "ref" / _key([str(base), str(tokens), args.ref, args.ref_fraction, cfg])
    if args.ref == "random":
        return train(spec, base, tokens, "sft", cfg, out,
                     SubsetSpec(fraction=args.ref_fraction, seed=0))[0]
    path, n_pool = clean_subset(tokens, out / "data")
    return train(spec, base, path, "sft", cfg, out,
                 SubsetSpec(size=round(args.ref_fraction * n_pool), seed=0))[0]


def make_scores(base: Path, ref: Path, tokens: Path, work: Path) -> Path:
    out = work / "scores" / _key([str(base), str(ref), str(tokens)])
    if not _done(out):
        t = pq.read_table(tokens, columns=["sample_id", "input_ids", "response_mask"])
        batch = {"sample_id": t["sample_id"].to_numpy(),
                 "input_ids": np.array([np.asarray(x, np.int64) for x in t["input_ids"].to_pylist()],
                                       dtype=object),
                 "response_mask": np.array([np.asarray(x, np.int8) for x in
                                            t["response_mask"].to_pylist()], dtype=object)}
        scorer = TokenScorer(str(base), str(ref), dtype="float32", device="cpu",
                             token_budget=8192, chunk_size=2048)
        res = scorer(batch)
        (out / "scores").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "sample_id": pa.array(res["sample_id"], pa.int64()),
            "base_loss": pa.array([x.tolist() for x in res["base_loss"]], pa.list_(pa.float32())),
            "ref_loss": pa.array([x.tolist() for x in res["ref_loss"]], pa.list_(pa.float32())),
        }), out / "scores" / "part-00000.parquet")
        _mark(out)
    return out / "scores"


def noise_auroc(tokens: Path, scores: Path, data: Path) -> dict[str, Any]:
    """AUROC of -score (and of ref CE, base CE alone) for noise tokens, overall and per kind."""
    kinds = [json.loads(x)["noise_kind"] for x in (data / "train.jsonl").read_text().splitlines()]
    t = pq.read_table(tokens, columns=["sample_id", "response_mask", "noise_mask"])
    s = pq.read_table(scores / "part-00000.parquet")
    by_id = {int(i): k for k, i in enumerate(s["sample_id"].to_numpy())}
    base_l, ref_l = s["base_loss"].to_pylist(), s["ref_loss"].to_pylist()
    sc, nz, kd, bl, rl = [], [], [], [], []
    for sid, rm, nm in zip(t["sample_id"].to_numpy(), t["response_mask"].to_pylist(),
                           t["noise_mask"].to_pylist(), strict=True):
        k = by_id[int(sid)]
        b, r = np.asarray(base_l[k], np.float64), np.asarray(ref_l[k], np.float64)
        sel = (np.asarray(rm) == 1) & (np.arange(len(rm)) >= 1)
        sc.append(b[sel] - r[sel])
        bl.append(b[sel])
        rl.append(r[sel])
        nz.append(np.asarray(nm)[sel].astype(bool))
        kd.extend([kinds[int(sid)] or "clean"] * int(sel.sum()))
    score, noise, kind = np.concatenate(sc), np.concatenate(nz), np.array(kd)
    base_ce, ref_ce = np.concatenate(bl), np.concatenate(rl)
    out: dict[str, Any] = {"auroc": auroc(-score, noise), "auroc_ref_ce": auroc(ref_ce, noise),
                           "auroc_base_ce": auroc(base_ce, noise),
                           "noise_token_fraction": float(noise.mean())}
    clean_tok = ~noise
    for k in ("wrong_value", "filler", "typo"):
        m = clean_tok | (noise & (kind == k))
        if (noise & (kind == k)).any():
            out[f"auroc_{k}"] = auroc(-score[m], noise[m])
    return out


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model_dir: Path, spec: ModelSpec, data: Path, max_gen: int = 48) -> dict[str, float]:
    """MC accuracy (sum log-likelihood of each full choice) and generation exact match
    (greedy, final answer after 'The answer is'), as the lm-eval tasks compute them.
    Cached beside the model (study_eval.json), keyed by the eval files."""
    cache = Path(model_dir) / "study_eval.json"
    ident = _key([(data / n).read_text() for n in ("eval_mc.jsonl", "eval_gen.jsonl")])
    if cache.is_file() and json.loads(cache.read_text()).get("ident") == ident:
        return json.loads(cache.read_text())["result"]
    result = _evaluate(model_dir, spec, data, max_gen)
    cache.write_text(json.dumps({"ident": ident, "result": result}))
    return result


def _evaluate(model_dir: Path, spec: ModelSpec, data: Path, max_gen: int) -> dict[str, float]:
    tok = load_tokenizer(spec, str(model_dir))
    model = load_model(str(model_dir), spec).eval()
    prompt = "<|user|>\n{q}\n<|assistant|>\n"
    mc = [json.loads(x) for x in (data / "eval_mc.jsonl").read_text().splitlines()]
    seqs, owners = [], []
    for i, row in enumerate(mc):
        ctx = tok(prompt.format(q=row["question"]), add_special_tokens=False)["input_ids"]
        for c in row["choices"]:
            full = tok(prompt.format(q=row["question"]) + c, add_special_tokens=False)["input_ids"]
            seqs.append((full, len(ctx)))
            owners.append(i)
    ll = _loglik(model, seqs, tok.pad_token_id or 0)
    scores = np.full((len(mc), 4), -np.inf)
    counts = [0] * len(mc)
    for (i, v) in zip(owners, ll, strict=True):
        scores[i, counts[i]] = v
        counts[i] += 1
    mc_acc = float(np.mean(scores.argmax(1) == np.array([r["gold"] for r in mc])))

    gen = [json.loads(x) for x in (data / "eval_gen.jsonl").read_text().splitlines()]
    hits = 0
    for chunk in range(0, len(gen), 32):
        rows = gen[chunk:chunk + 32]
        outs = _greedy(model, tok, [prompt.format(q=r["question"]) for r in rows], max_gen)
        for r, text in zip(rows, outs, strict=True):
            text = text.split(EOS)[0].split("\n<|")[0]
            found = ANSWER_RE.findall(text)
            gold = str(r["answer"]).split("The answer is")[-1].strip().rstrip(".").strip()
            hits += bool(found) and found[-1].strip().lower() == gold.lower()
    return {"mc_acc": mc_acc, "gen_em": hits / len(gen)}


def _loglik(model, seqs: list[tuple[list[int], int]], pad: int, bs: int = 64) -> list[float]:
    out = []
    for s in range(0, len(seqs), bs):
        part = seqs[s:s + bs]
        width = max(len(f) for f, _ in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        for i, (f, _) in enumerate(part):
            ids[i, :len(f)] = torch.tensor(f)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        for i, (f, c) in enumerate(part):
            tgt = torch.tensor(f[c:])
            out.append(float(logp[i, c - 1:len(f) - 1].gather(1, tgt[:, None]).sum()))
    return out


def _greedy(model, tok, prompts: list[str], max_new: int) -> list[str]:
    """Greedy continuation of each prompt, one row at a time with the KV cache (tiny models:
    no padding subtleties across families)."""
    texts = []
    eos = tok.eos_token_id
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
    return texts


# ----------------------------------------------------------------------------- driver


def run_family(family: str, args, work: Path, synth, data: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = make_spec(args, family)
    base = make_base(spec, synth, data, args, work)
    tokens = make_tokens(spec, base, data, args, work)
    n_tok = int(pq.read_table(tokens, columns=["num_tokens"])["num_tokens"].to_numpy().sum())
    res: dict[str, Any] = {"family": family, "train_tokens_per_epoch": n_tok,
                           "base": evaluate(base, spec, data)}
    t_base = time.perf_counter()
    ref = make_reference(spec, base, tokens, data, args, work)
    scores = make_scores(base, ref, tokens, work)
    res["reference"] = evaluate(ref, spec, data)
    res["detector"] = noise_auroc(tokens, scores, data)
    part_dir = work / "partition" / _key([str(scores), args.rho])
    if not _done(part_dir):
        run_partition(tokens, scores, PartitionConfig(rho=args.rho), part_dir)
        _mark(part_dir)
    rep = json.loads((part_dir / "report.json").read_text())
    res["partition"] = {k: rep.get(k) for k in ("precision", "recall", "f1", "auroc")}
    print(f"  {family} base {res['base']} reference {res['reference']} detector "
          f"{json.dumps(res['detector'])}", flush=True)
    t_ref = time.perf_counter()
    if args.detector_only:
        return res
    runs: dict[str, list[dict[str, float]]] = {}
    train_seconds = []
    for method in args.methods:
        for seed in args.seeds:
            cfg = _train_dict(args, seed, args.lr, args.epochs)
            parquet = tokens if method == "sft" else part_dir / "partitioned.parquet"
            out = work / "train" / _key([str(base), str(parquet), method, cfg])
            model_dir, secs = train(spec, base, parquet, method, cfg, out)
            train_seconds.append(secs)
            ev = evaluate(model_dir, spec, data)
            runs.setdefault(method, []).append(ev)
            print(f"  {family} {method} s{seed}: mc {ev['mc_acc']:.3f} gen {ev['gen_em']:.3f}",
                  flush=True)
    res["runs"] = runs
    res["summary"] = {m: {k: [float(np.mean([r[k] for r in rs])),
                              float(np.max([r[k] for r in rs]) - np.min([r[k] for r in rs]))]
                          for k in ("mc_acc", "gen_em")} for m, rs in runs.items()}
    res["seconds_wall"] = {"base_and_eval": t_base - t0, "reference_scoring": t_ref - t_base,
                      "methods": time.perf_counter() - t_ref,
                      "train_cpu_median": float(np.median(train_seconds)) if train_seconds else 0}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["llama", "qwen2", "gpt_neo"])
    ap.add_argument("--methods", nargs="+", default=["sft", "ignore", "forget"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--num-train", type=int, default=1200)
    ap.add_argument("--num-eval", type=int, default=100)
    ap.add_argument("--noise-fraction", type=float, default=0.3)
    ap.add_argument("--noise-kinds", nargs="+", default=["wrong_value", "filler", "typo"])
    ap.add_argument("--tasks", nargs="+", default=["arithmetic", "world_facts", "list_ops", "string_ops"])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--warmup-lr", type=float, default=3e-3)
    ap.add_argument("--warmup-rows", type=int, default=4000)
    ap.add_argument("--warmup-batch", type=int, default=32)
    ap.add_argument("--warmup-tasks", nargs="+", default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--ref", choices=["random", "clean"], default="random")
    ap.add_argument("--ref-fraction", type=float, default=0.3)
    ap.add_argument("--ref-lr", type=float, default=None)
    ap.add_argument("--ref-epochs", type=float, default=None)
    ap.add_argument("--rho", type=float, default=0.7)
    ap.add_argument("--lam", type=float, default=0.25)
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--detector-only", action="store_true", help="stop after scoring")
    ap.add_argument("--work", default="/tmp/lethe_study")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    work = Path(args.work)
    synth, data = make_data(args, work)
    started = time.perf_counter()
    results = {"args": vars(args), "families": []}
    for fam in args.families:
        results["families"].append(run_family(fam, args, work, synth, data))
        print(json.dumps({k: v for k, v in results["families"][-1].items() if k != "runs"}),
              flush=True)
    results["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"total {results['seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
