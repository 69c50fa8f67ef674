"""benchmarks/gpu_check.py, the script a lent GPU machine runs first: its dry run (CPU, tiny
shapes, same functions) with only what that machine would have importable, and the wheel
list docs/GPU.md tells a user to carry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gpu_check_constants() -> tuple[tuple[str, ...], tuple[str, ...]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ON_GPU_MACHINE, module.CARRIED_WHEELS


def _gpu_machine_site(folder: Path) -> set[str]:
    """A site folder holding what a lent GPU machine has (torch, transformers, ninja and
    their dependencies) plus the carried wheels, as links into this environment: run with
    `python -S` and this folder on PYTHONPATH, nothing else is importable (no Ray, MLflow,
    pandas, scipy, lm-eval...), and transformers' is-X-available checks see what it would."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    there, carried = _gpu_check_constants()
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in (*there, *carried)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    folder.mkdir(parents=True)
    for name in seen:
        dist = md.distribution(name)
        root = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            if not (folder / top).exists() and (root / top).exists():
                (folder / top).symlink_to(root / top)
    return seen


def test_docs_gpu_lists_the_carried_wheels():
    """docs/GPU.md's wheel-building block names every wheel the dry run carries, and no Ray."""
    import re

    from packaging.utils import canonicalize_name

    _, carried = _gpu_check_constants()
    block = (REPO / "docs" / "GPU.md").read_text().split("mkdir wheels", 1)[1].split("```", 1)[0]
    names = {canonicalize_name(w.split("==")[0]) for w in block.split()
             if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*(==[\w.]+)?", w)}
    assert {canonicalize_name(w) for w in carried} <= names, names
    assert "ray" not in names


@pytest.mark.slow  # ~20 s of CPU
def test_gpu_check_dry_run(tmp_path):
    """The script a lent GPU machine runs, on CPU with tiny shapes, importing only what
    that machine would have (Ray, MLflow and the rest are not importable)."""
    out = tmp_path / "gpu_check.json"
    site = tmp_path / "gpu-machine-site"
    dists = _gpu_machine_site(site)
    assert "ray" not in dists and "mlflow" not in dists and "torch" in dists
    # DeepSpeed's CPU accelerator would JIT-build its shared-memory all-reduce op (a GPU run
    # never builds it); keyed to the package path, building it from `site` would also force
    # a rebuild of the shared torch-extension cache for every other test.
    runner = ("import runpy, sys\n"
              "import deepspeed.ops\n"
              "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] = False\n"
              f"sys.argv = ['gpu_check.py', '--dry-run', '--out', {str(out)!r}]\n"
              "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")
    # Nothing of this process's process groups leaks in (a bound MASTER_PORT would).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
    env["DS_ACCELERATOR"] = "cpu"
    import resource

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-S", "-c", runner], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time, not wall time: the shared test machine's load must not fail the test.
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True, report
    assert set(report["sections"]) == {"chunked_ce", "scorer", "train_zero3", "train_zero2",
                                       "all_reduce"}
    assert all(s["ok"] for s in report["sections"].values()), report["sections"]
    ce = report["sections"]["chunked_ce"]
    assert ce["max_abs_diff_vs_unfused"] < 0.05 and ce["max_abs_diff_vs_fp32"] < 0.05
    for name in ("train_zero3", "train_zero2"):
        train = report["sections"][name]
        assert train["steps"] == 3 and train["checkpoint_calls"] > 0, train
    assert report["sections"]["all_reduce"]["matches"] is True
    assert report["ray_imported"] is False
    print(f"gpu_check --dry-run: {cpu_seconds:.1f} s CPU")
    assert cpu_seconds < 60, cpu_seconds
