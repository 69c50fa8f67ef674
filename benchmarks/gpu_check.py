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
The sections live in gpu_check_ops.py (shapes, chunked_ce, scorer) and gpu_check_train.py
(train_zero*, all_reduce).
Last line: `ratio scorer/naive tokens_per_s X`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run through runpy

from gpu_check_ops import check_chunked_ce, check_scorer, free  # noqa: E402
from gpu_check_train import check_all_reduce, check_training  # noqa: E402

# What a lent GPU machine has (with their dependencies), and the wheels carried to it
# (docs/GPU.md: how). The dry-run test runs this script with exactly these importable.
ON_GPU_MACHINE = ("torch", "transformers", "ninja")
CARRIED_WHEELS = ("deepspeed", "hjson", "msgpack", "einops", "py-cpuinfo", "psutil",
                  "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                  "typing-extensions", "peft", "accelerate", "pyarrow")

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
                free(device)
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
