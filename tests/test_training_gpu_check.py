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
    proc = subprocess.run([sys.executable, "-S", "-c", runner], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True, report
    assert set(report["sections"]) == {"chunked_ce", "scorer", "train_zero3", "train_zero2",
                                       "all_reduce"}
    assert all(s["ok"] for s in report["sections"].values()), report["sections"]
    ce = report["sections"]["chunked_ce"]
    assert set(ce["checks"]) == {f"{t}_vs_{r}" for t in ("ce", "grad_hidden", "grad_weight")
                                 for r in ("fp32", "unfused")}
    assert set(report["sections"]["scorer"]["checks"]) == {"base_loss", "ref_loss"}
    for section in ("chunked_ce", "scorer"):  # every tolerance printed beside its figure
        for check in report["sections"][section]["checks"].values():
            assert check["ok"] and check["max"] <= check["max_tol"], check
            assert f"(tol {check['max_tol']:g})" in proc.stdout
    for name in ("train_zero3", "train_zero2"):
        train = report["sections"][name]
        assert train["steps"] == 3 and train["checkpoint_calls"] > 0, train
    assert report["sections"]["all_reduce"]["matches"] is True
    assert report["ray_imported"] is False
    for name in ("train_zero3", "train_zero2"):  # read from the job, as it ran
        assert (report["sections"][name]["lora_r"], report["sections"][name]["dtype"]) == (
            64, "bfloat16")



# ------------------------------------------------------------- planted wrong results fail


def _ops():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check_ops

    return gpu_check_ops


def _with_grad(x, change):
    """x unchanged forward; its gradient goes through `change` on the way back (a planted
    bug in the backward of whatever consumes x)."""
    import torch

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return change(grad.clone())

    return Planted.apply(x)


@pytest.mark.parametrize("wrong", ["hidden", "weight"])
def test_a_planted_wrong_gradient_fails_the_chunked_ce_check(monkeypatch, wrong):
    """chunked_token_ce with one gradient 3 % off (forward untouched): the section fails,
    on exactly that gradient's two comparisons; the real one passes the same check."""
    import torch

    from orchestrator.method import token_loss

    ops = _ops()
    clean = ops.check_chunked_ce(torch.device("cpu"), "tiny")
    assert clean["ok"] and clean["failed"] == [], clean["checks"]

    real = token_loss.chunked_token_ce

    def planted(hidden, weight, targets, **kw):
        if wrong == "hidden":
            hidden = _with_grad(hidden, lambda g: g * 1.03)
        else:
            weight = _with_grad(weight, lambda g: g * 1.03)
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(token_loss, "chunked_token_ce", planted)
    out = ops.check_chunked_ce(torch.device("cpu"), "tiny")
    assert out["ok"] is False
    assert out["failed"] == [f"grad_{wrong}_vs_fp32", f"grad_{wrong}_vs_unfused"], out["checks"]


def test_a_hidden_gradient_missing_one_chunk_fails(monkeypatch):
    """The last chunk's rows get no hidden-state gradient: the section fails."""
    import torch

    from orchestrator.method import token_loss

    ops = _ops()
    real = token_loss.chunked_token_ce
    chunk = ops.SIZES["tiny"]["ce_chunk"]

    def drop_last_chunk(grad):
        grad[-chunk:] = 0
        return grad

    monkeypatch.setattr(token_loss, "chunked_token_ce",
                        lambda h, w, t, **kw: real(_with_grad(h, drop_last_chunk), w, t, **kw))
    out = ops.check_chunked_ce(torch.device("cpu"), "tiny")
    assert out["ok"] is False
    assert out["failed"] == ["grad_hidden_vs_fp32", "grad_hidden_vs_unfused"], out["checks"]
    assert out["checks"]["grad_hidden_vs_fp32"]["max"] > 0.5


def test_scores_one_position_off_fail_the_scorer_check(monkeypatch):
    """TokenScorer returning each row's base losses one response position late (finite
    values, only misplaced) fails the check on the tolerance."""
    import numpy as np
    import torch

    from orchestrator.scoring import scorer as scorer_module

    ops = _ops()
    real_call = scorer_module.TokenScorer.__call__

    def shifted(self, batch):
        out = real_call(self, batch)
        for row in out["base_loss"]:
            scored = ~np.isnan(row)
            row[scored] = np.roll(row[scored], 1)
        return out

    monkeypatch.setattr(scorer_module.TokenScorer, "__call__", shifted)
    out = ops.check_scorer(torch.device("cpu"), "tiny")
    assert out["ok"] is False and out["failed"] == ["base_loss"], out["checks"]
    assert np.isfinite(out["checks"]["base_loss"]["max"])
