"""Effect study of a shipped config, Ray-free: base, sft, ignore, forget over seeds on a real
model, with paired CIs and the minimum detectable effect (issue 25).

Reads the same YAML as `lethe run` (dotted `--set` overrides as on lethe's command line) and
runs the plain stage functions: synthetic corpus, base (GGUF de-quantized once), tokens,
reference (clean or random subset), scores, partition, one training per method and seed
(`run_training_local`), then the test and validation questions (scripts/study_eval.py,
batched). Every stage is cached under --work by a hash of what determines it, so a change of
train.* re-trains and re-evaluates only the method runs, never re-scores.

    nice -n 19 .venv/bin/python scripts/paper_regime_study.py configs/smollm2-paper-regime.yaml \\
        --set data.synthetic.num_train=240 --out /tmp/study/paper.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from effect_study import make_scores, noise_auroc  # noqa: E402
from study_eval import evaluate_sets  # noqa: E402

from orchestrator.config import TrainConfig, load_config  # noqa: E402
from orchestrator.data import generate_synthetic, prepare_dataset  # noqa: E402
from orchestrator.data.trusted import write_clean_rows  # noqa: E402
from orchestrator.models import load_tokenizer, materialize_base  # noqa: E402
from orchestrator.partition import run_partition  # noqa: E402
from orchestrator.tracking.effect import paired_effect  # noqa: E402
from orchestrator.tracking.power import effect_power  # noqa: E402
from orchestrator.training import SubsetSpec, TrainJob, run_training_local  # noqa: E402
from orchestrator.training.deepspeed_setup import warmup_linear_decay  # noqa: E402

PAIRS = (("sft", "base"), ("ignore", "sft"), ("forget", "sft"), ("forget", "ignore"))
METRICS = ("mc_acc", "gen_em")


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fields(section: Any) -> dict[str, Any]:
    """What keys a stage: the fields set away from their defaults, so that a field added to
    the schema later (with a default) leaves earlier stages cached."""
    return section.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _once(path: Path, make: Any) -> Path:
    if not (path / "_DONE").is_file():
        make()
        (path / "_DONE").write_text("ok")
    return path


def cumulative_lr(lr: float, steps: int, warmup_ratio: float) -> float:
    """sum over the optimizer steps of the learning rate the scheduler applies."""
    factor = warmup_linear_decay(steps, warmup_ratio)
    return lr * sum(factor(s) for s in range(steps))


def train(cfg, spec, base: str, parquet: Path, method: str, train_cfg: dict, out: Path,
          subset: SubsetSpec | None = None) -> dict[str, Any]:
    job = TrainJob(train_path=str(parquet), base_model_path=base,
                   model=spec.model_dump(mode="json"), train=train_cfg, method=method,
                   output_dir=str(out), run_name=out.name, storage_path=str(out / "ray"),
                   class_column="response_mask" if method == "sft" else "token_class",
                   subset=subset)
    res = run_training_local(job)
    m = res.metrics
    return {"export": res.export_dir, "steps": res.steps, "wall_s": m.get("wall_seconds"),
            "sum_lr": cumulative_lr(train_cfg["lr"], res.steps, train_cfg["warmup_ratio"]),
            "final_pos_loss": m.get("pos_loss"), "final_neg_loss": m.get("neg_loss")}


def stages(cfg, work: Path, need_partition: bool = True) -> dict[str, Any]:
    spec = cfg.models[0]
    synth = cfg.data.synthetic
    data = work / "data" / _key(_fields(synth))
    _once(data, lambda: generate_synthetic(synth, data))
    base_dir = work / "base" / _key(_fields(spec))
    _once(base_dir, lambda: materialize_base(spec, [], base_dir / "model"))
    base = str(base_dir / "model")
    tok_dir = work / "tokens" / _key([base, _fields(cfg.data)])
    _once(tok_dir, lambda: prepare_dataset(cfg.data, load_tokenizer(spec, base), tok_dir,
                                           rows_path=str(data / "train.jsonl")))
    tokens = tok_dir / "tokens.parquet"
    out = {"spec": spec, "data": data, "base": base, "tokens": tokens}
    if not need_partition:  # sft alone trains on every response token
        return out
    r = cfg.reference
    # The method-only fields (objective, lambda) take their defaults: changing them must
    # not re-train the reference (an SFT run) nor re-score.
    method_only = {f: TrainConfig.model_fields[f].default
                   for f in ("methods", "negative_term", "lambda_", "normalization")}
    ref_train = cfg.train.model_copy(update={
        **method_only, "seed": r.seed, "lr": r.lr or cfg.train.lr,
        "epochs": r.epochs or cfg.train.epochs,
        "lora": r.lora or cfg.train.lora}).model_dump(mode="json", by_alias=True)
    ref_key = cfg.train.model_copy(update={**method_only, "seed": r.seed, "lr": r.lr or cfg.train.lr,
                                           "epochs": r.epochs or cfg.train.epochs,
                                           "lora": r.lora or cfg.train.lora})
    ref_out = work / "ref" / _key([base, str(tokens), _fields(r), _fields(ref_key)])
    if r.subset_source == "clean":
        clean = ref_out / "data" / "clean_rows.parquet"
        clean.parent.mkdir(parents=True, exist_ok=True)
        n_pool = write_clean_rows(tokens, clean)[1]
        size = r.subset_size or round((r.subset_fraction or 1.0) * n_pool)
        ref = train(cfg, spec, base, clean, "sft", ref_train, ref_out, SubsetSpec(size=size, seed=r.seed))
    else:
        ref = train(cfg, spec, base, tokens, "sft", ref_train, ref_out,
                    SubsetSpec(fraction=r.subset_fraction, size=r.subset_size, seed=r.seed))
    scores = make_scores(Path(base), Path(ref["export"]), tokens, work)
    part = work / "partition" / _key([str(scores), _fields(cfg.partition)])
    _once(part, lambda: run_partition(tokens, scores, cfg.partition, part))
    return {**out, "ref": ref, "scores": scores, "partition": part}


def summarise(runs: dict[str, dict[int, dict[str, float]]], base: dict[str, float],
              metrics: tuple[str, ...]) -> dict[str, Any]:
    """Per method mean / sd, and per pair the paired effect with its CI and power."""
    table: dict[str, Any] = {"methods": {}, "pairs": []}
    for method, by_seed in runs.items():
        table["methods"][method] = {
            m: [float(np.mean([v[m] for v in by_seed.values()])),
                float(np.std([v[m] for v in by_seed.values()], ddof=1)) if len(by_seed) > 1 else None]
            for m in metrics}
    per_method = {k: v for k, v in runs.items()}
    seeds = sorted({s for v in runs.values() for s in v})
    per_method["base"] = {s: base for s in seeds}  # the base is one model: the same every seed
    for a, b in PAIRS:
        if a not in per_method or b not in per_method:
            continue
        for m in metrics:
            eff = paired_effect({s: v[m] for s, v in per_method[a].items()},
                                {s: v[m] for s, v in per_method[b].items()}, a=a, b=b)
            p = effect_power(eff)
            table["pairs"].append({"pair": f"{a} - {b}", "metric": m, "n": eff.n,
                                   "mean": eff.mean, "lo": eff.lo, "hi": eff.hi,
                                   "significant": eff.significant,
                                   "half_width": p.half_width if p else None,
                                   "mde": p.mde if p else None})
    return table


# Overrides that change the partition or the forgetting objective only: an sft run is the same
# with or without them.
METHOD_ONLY_KEYS = ("partition.", "train.lambda", "train.negative_term", "train.methods")


def earlier_sft(path: Path, config: str, overrides: list[str]) -> list[dict[str, Any]]:
    """The sft trainings of an earlier result; refused unless it ran the same config with the
    same overrides apart from the method-only ones."""
    earlier = json.loads(path.read_text())

    def shared(o: list[str]) -> list[str]:
        return sorted(x for x in o if not x.startswith(METHOD_ONLY_KEYS))

    if earlier.get("config") != config or shared(earlier.get("overrides", [])) != shared(overrides):
        raise SystemExit(f"--sft-from {path}: ran {earlier.get('config')} with "
                         f"{shared(earlier.get('overrides', []))}, not {config} with {shared(overrides)}")
    runs = [t for t in earlier.get("trainings", []) if t["method"] == "sft"]
    if not runs:
        raise SystemExit(f"--sft-from {path}: no sft training in it")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--methods", nargs="+", default=None, help="default: train.methods")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: seeds")
    ap.add_argument("--sets", nargs="+", default=["eval"], help="question sets: eval (test), valid")
    ap.add_argument("--detector-only", action="store_true", help="stop after the partition")
    ap.add_argument("--sft-from", default=None, metavar="RESULT_JSON",
                    help="take the sft runs from an earlier result of the same config and data "
                         "(sft does not depend on rho, lambda or the negative term)")
    ap.add_argument("--work", default="/tmp/lethe_paper_study")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "2")))
    cfg = load_config(args.config, args.overrides)
    work = Path(args.work)
    t0 = time.perf_counter()
    methods = args.methods or cfg.train.methods
    st = stages(cfg, work, need_partition=args.detector_only or set(methods) != {"sft"})
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides,
                              "train_rows": pq.read_metadata(st["tokens"]).num_rows}
    if "partition" in st:
        rep = json.loads((st["partition"] / "report.json").read_text())
        result.update({
            "reference": st["ref"], "detector": noise_auroc(st["tokens"], st["scores"], st["data"]),
            "partition": {k: rep.get(k) for k in ("precision", "recall", "f1", "auroc", "noise_by_kind")}})
        print(json.dumps({k: result[k] for k in ("reference", "detector", "partition")}), flush=True)
    if not args.detector_only:
        sets = tuple(args.sets)
        result["base"] = evaluate_sets(st["base"], st["spec"], st["data"], sets)
        print(f"base {json.dumps(result['base'])}", flush=True)
        runs: dict[str, dict[str, dict[int, dict[str, float]]]] = {s: {} for s in sets}
        result["trainings"] = []
        # Seed-major: a run cut short still leaves complete pairs of the seeds it finished.
        for seed in args.seeds or cfg.seeds or [cfg.train.seed]:
            for method in methods:
                run_cfg = cfg.train.model_copy(update={"seed": seed})
                tc = run_cfg.model_dump(mode="json", by_alias=True)
                parquet = st["tokens"] if method == "sft" else st["partition"] / "partitioned.parquet"
                out = work / "train" / _key([st["base"], str(parquet), method, _fields(run_cfg)])
                info = train(cfg, st["spec"], st["base"], parquet, method, tc, out)
                ev = evaluate_sets(info["export"], st["spec"], st["data"], sets)
                result["trainings"].append({"method": method, "seed": seed, **info, "eval": ev})
                for s in sets:
                    runs[s].setdefault(method, {})[seed] = ev[s]
                print(f"{method} s{seed}: steps {info['steps']} wall {info['wall_s']:.0f}s "
                      f"sum_lr {info['sum_lr']:.4g} {json.dumps(ev)}", flush=True)
        if args.sft_from:
            result["sft_from"] = args.sft_from
            for t in earlier_sft(Path(args.sft_from), args.config, args.overrides):
                result["trainings"].append({**t, "from": args.sft_from})
                for s in sets:
                    runs[s].setdefault("sft", {})[t["seed"]] = t["eval"][s]
        result["summary"] = {s: summarise(runs[s], result["base"][s], METRICS) for s in sets}
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result.get("summary", {}), indent=1, default=str))
    print(f"total {result['seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
