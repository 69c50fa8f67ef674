"""What a first GPU run needs, proven on CPU: training in train mode (gradient checkpointing
really runs), no silent CPU fallback when GPUs are asked for, an out-of-memory error that
reaches the caller. The collectives on the backend's device are in test_gpu_collectives.py;
the GPU check script's dry run is in test_training_gpu_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_training_support import make_corpus, make_job, tiny_spec

from orchestrator.method import token_loss
from orchestrator.training import run_training_local

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("gpu_ready")
    return tmp, tiny_base, make_corpus(tmp / "corpus.parquet", n=16)


# ----------------------------------------------------- train mode, checkpointing (point 2)


def test_training_runs_in_train_mode_with_checkpointing(assets, monkeypatch):
    """No validation split (nothing calls validate()): the model must still train in train
    mode, so gradient checkpointing fires on every layer of every micro-batch."""
    import transformers.modeling_utils as mu

    tmp, base, data = assets
    calls = {"n": 0}
    real = mu.checkpoint

    def counting(fn, *args, **kwargs):
        calls["n"] += 1
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)
    job = make_job(tmp, base, data, method="forget", name="ckpt", max_steps=2, micro_batch_size=4,
                   gradient_checkpointing=True, lora={"r": 4, "alpha": 8, "dropout": 0.1,
                                                      "target_modules": ["q_proj", "v_proj"]})
    assert job.validation_path is None
    result = run_training_local(job)
    assert result.steps == 2
    assert calls["n"] == 2 * 2, calls  # 2 layers x 2 micro-batches (forward side)


def test_zero3_lora_trains_in_train_mode_after_validation_and_resume(assets, monkeypatch):
    """The paper's setting (ZeRO-3, LoRA with dropout, gradient checkpointing) with a
    validation split evaluated every step and a resume from a checkpoint: every training
    forward runs in train mode with gradients, and checkpoints every layer; every
    validation forward runs in eval mode without; the target rows come from the host."""
    import transformers.modeling_utils as mu

    from orchestrator.training import deepspeed_setup

    tmp, base, data = assets
    calls = {"n": 0}
    forwards: list[tuple[bool, bool, bool]] = []
    real_checkpoint, real_forward = mu.checkpoint, deepspeed_setup.DeepSpeedEngine.forward

    def counting(fn, *args, **kwargs):
        calls["n"] += 1
        return real_checkpoint(fn, *args, **kwargs)

    def watched(self, batch):
        forwards.append((self.engine.module.training, torch.is_grad_enabled(), "rows" in batch))
        return real_forward(self, batch)

    monkeypatch.setattr(mu, "checkpoint", counting)
    monkeypatch.setattr(deepspeed_setup.DeepSpeedEngine, "forward", watched)
    job = make_job(tmp, base, data, method="forget", name="z3-modes", max_steps=3,
                   micro_batch_size=4, gradient_checkpointing=True, checkpoint_every=1,
                   eval_every=1, deepspeed="configs/deepspeed/zero3.json",
                   lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]})
    job.validation_path = str(make_corpus(tmp / "z3-valid.parquet", n=4, seed=5, noise=0.0))
    job.test_hooks = {"_fail_once_at_step": 2}
    layers = 2
    for expect_steps in (2, 1):  # fails after step 2's checkpoint, then resumes for step 3
        calls["n"], forwards[:] = 0, []
        if expect_steps == 2:
            with pytest.raises(RuntimeError, match="injected failure"):
                run_training_local(job)
        else:
            result = run_training_local(job)
            assert result.steps == 3 and result.metrics["resumed_from_step"] == 2
            assert result.metrics["zero_stage"] == 3
        training = [f for f in forwards if f[1]]
        validation = [f for f in forwards if not f[1]]
        assert len(training) == expect_steps and len(validation) >= expect_steps, forwards
        assert all(mode for mode, _, _ in training), forwards
        assert not any(mode for mode, _, _ in validation), forwards
        assert all(rows for _, _, rows in forwards), forwards
        assert calls["n"] == layers * len(training), (calls, forwards)


def test_target_rows_on_the_host_match_the_device_path(assets):
    """`target_rows` picks the rows the loss model would pick itself, and a target outside
    the vocabulary is named on the host, with its row and position."""
    from orchestrator.models import load_model
    from orchestrator.training.collate import collate
    from orchestrator.training.loss import TokenLossModel, target_rows

    _, base, _ = assets
    model = TokenLossModel(load_model(base, tiny_spec()), chunk_size=5).eval()
    ids = [torch.arange(10, 22).numpy(), torch.arange(40, 47).numpy()]
    cls = [torch.tensor([0, 0, 1, 1, -1, 1, 0, 1, 1, -1, 1, 1]).numpy(),
           torch.tensor([0, 1, 1, -1, 1, 1, 1]).numpy()]
    batch = collate(ids, cls, pad_id=0)
    with torch.no_grad():
        ce_old, cls_old = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                batch["target_class"])
        ce_new, cls_new = model(**target_rows(batch, model.vocab_size))
    assert torch.equal(ce_old, ce_new) and torch.equal(cls_old, cls_new)
    batch["labels"][1, 3] = model.vocab_size + 7
    with pytest.raises(ValueError, match=rf"target id {model.vocab_size + 7} at row 1, position 3"):
        target_rows(batch, model.vocab_size)


# ---------------------------------------------- checkpoints without the frozen base (point 4)


def test_lora_deepspeed_checkpoint_skips_frozen_base_and_resumes(assets):
    """LoRA + ZeRO-2: the checkpoint holds the adapters, not the base (every rank would write
    the whole base to shared storage at each checkpoint), and a resume still works."""
    tmp, base, data = assets
    job = make_job(tmp, base, data, method="forget", name="lora-resume", max_steps=2,
                   micro_batch_size=4, checkpoint_every=1, deepspeed="configs/deepspeed/zero2.json",
                   lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    job.test_hooks = {"_fail_once_at_step": 1}
    with pytest.raises(RuntimeError, match="injected failure"):
        run_training_local(job)
    ckpt = Path(job.storage_path) / job.run_name / "checkpoints" / "checkpoint_00000001"
    module_file = next(ckpt.rglob("*model_states.pt"))
    base_bytes = (Path(base) / "model.safetensors").stat().st_size
    assert module_file.stat().st_size < 0.5 * base_bytes, (module_file.stat().st_size, base_bytes)
    result = run_training_local(job)
    assert result.steps == 2 and result.metrics["resumed_from_step"] == 1
    assert (Path(result.export_dir) / "model.safetensors").is_file()


# --------------------------------------------------------- no silent CPU fallback (point 3)


@NO_CUDA
def test_gpu_config_fails_clearly_without_cuda(assets):
    tmp, base, data = assets
    job = make_job(tmp, base, data, name="wants-gpu", use_gpu=True, gpus_per_worker=1.0)
    with pytest.raises(RuntimeError, match="train.use_gpu is true, but no CUDA device is visible"):
        run_training_local(job)
    assert not Path(job.output_dir, "metrics.json").exists()


def test_embedded_ray_without_gpus_refuses_a_gpu_config_at_start(monkeypatch):
    """The embedded instance has no autoscaler: a GPU stage it cannot place would wait
    forever. `lethe run` fails at Ray's start instead, naming the fields; a CPU config and a
    remote cluster (which may add GPU nodes) are left alone."""
    import ray

    from orchestrator.config import ConfigError, load_config
    from orchestrator.pipeline import run as pipeline_run

    paper = load_config(str(REPO / "configs/paper/llama3.2-1b.yaml"))
    short = pipeline_run.local_gpu_shortfall(paper, 0.0)
    assert any("train.use_gpu" in s or "train.gpus_per_worker" in s for s in short), short
    assert pipeline_run.local_gpu_shortfall(paper, 64.0) == []
    assert pipeline_run.local_gpu_shortfall(load_config(str(REPO / "configs/demo.yaml")), 0.0) == []

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    paper.ray.address = None
    with pytest.raises(ConfigError, match=r"asks for GPUs, but the embedded Ray instance sees 0"):
        pipeline_run.init_ray(paper)
    assert calls == ["init", "shutdown"]  # the instance it started is stopped again


@NO_CUDA
def test_scoring_and_loading_refuse_cuda_without_cuda(assets):
    from orchestrator.models import load_model
    from orchestrator.scoring.scorer import TokenScorer

    _, base, _ = assets
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        load_model(base, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        TokenScorer(base, base, device="cuda")


def test_scoring_actors_follow_the_config_device_and_attention(assets):
    """An actor that reserved GPUs scores on CUDA (and fails clearly without one), a CPU
    actor on CPU, whatever is visible; the model's attention implementation reaches it."""
    from orchestrator.config_sections import ScoringConfig
    from orchestrator.scoring.scorer import TokenScorer
    from orchestrator.scoring.stage import _scorer_kwargs

    _, base, _ = assets
    gpu = _scorer_kwargs(base, base, ScoringConfig(num_gpus_per_actor=1), False, "eager")
    cpu = _scorer_kwargs(base, base, ScoringConfig(num_gpus_per_actor=0), False, "eager")
    assert gpu["device"] == "cuda" and cpu["device"] == "cpu"
    assert gpu["attn_implementation"] == cpu["attn_implementation"] == "eager"
    cpu.pop("packing")
    scorer = TokenScorer(**cpu)
    assert {m.config._attn_implementation for m in scorer.models.values()} == {"eager"}


def test_load_model_puts_weights_straight_on_the_gpu(assets, monkeypatch):
    """device="cuda:1": from_pretrained gets device_map={"": cuda:1}, so the weights are
    read straight into GPU memory, never staged as a full copy in host RAM first."""
    from orchestrator.models import loading

    _, base, _ = assets
    seen = {}

    class Loaded:
        def to(self, device):
            seen["to"] = device
            return self

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return Loaded()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    loading.load_model(base, device="cuda:1", dtype=torch.bfloat16)
    assert seen["device_map"] == {"": torch.device("cuda", 1)}
    seen.clear()
    loading.load_model(base, device="cpu")
    assert "device_map" not in seen and seen["to"] == "cpu"


@NO_CUDA
def test_evaluation_refuses_cpu_when_gpus_asked():
    from orchestrator.config import EvaluateConfig
    from orchestrator.evaluation.runner import evaluate_model

    cfg = EvaluateConfig(num_gpus=1.0, tasks=["x"])
    with pytest.raises(RuntimeError, match="evaluate.num_gpus is 1.0, but no CUDA device"):
        evaluate_model("/nonexistent", cfg, None, device="cpu")


# -------------------------------------------------- token_loss fast path and OOM (point 5)


def test_oom_in_fast_matmul_propagates_and_keeps_fast_path(monkeypatch):
    """bf16 inputs take the `mm(out_dtype=fp32)` path. A (simulated) OOM there must reach the
    caller and must not switch the process to the slow path for good."""
    monkeypatch.setattr(token_loss, "_MM_OUT_DTYPE_OK", {})
    real_mm = torch.mm
    state = {"calls": 0, "fast": 0}

    def fake_mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return real_mm(a, b, *args, **kwargs)
        state["calls"] += 1
        if state["calls"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        state["fast"] += 1
        return (a.float() @ b.float())  # what the CUDA kernel computes (fp32 accumulate)

    monkeypatch.setattr(torch, "mm", fake_mm)
    h = torch.randn(6, 8, dtype=torch.bfloat16)
    w = torch.randn(11, 8, dtype=torch.bfloat16)
    y = torch.tensor([1, 2, 3, -100, 4, 5])
    with pytest.raises(torch.OutOfMemoryError):
        token_loss.chunked_token_ce(h, w, y, chunk_size=4)
    assert False not in token_loss._MM_OUT_DTYPE_OK.values()  # fast path still on
    ce = token_loss.chunked_token_ce(h, w, y, chunk_size=4)
    assert state["fast"] >= 2  # both chunks took the fast path
    ref = torch.nn.functional.cross_entropy(h.float() @ w.float().t(), y, reduction="none",
                                            ignore_index=-100)
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_out_dtype_falls_back_once(monkeypatch):
    """A device without the kernel is detected by a probe and uses the bf16 path (CPU here)."""
    monkeypatch.setattr(token_loss, "_MM_OUT_DTYPE_OK", {})
    h = torch.randn(5, 8, dtype=torch.bfloat16)
    w = torch.randn(7, 8, dtype=torch.bfloat16)
    ce = token_loss.chunked_token_ce(h, w, torch.tensor([0, 1, 2, 3, 4]), chunk_size=2)
    assert ce.dtype == torch.float32 and torch.isfinite(ce).all()
    assert set(token_loss._MM_OUT_DTYPE_OK) == {("cpu", torch.bfloat16)}


# ------------------------------------------------------------- DeepSpeed configs (point 4)


def test_deepspeed_configs_overlap_communication():
    for name in ("zero2.json", "zero3.json"):
        cfg = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
        assert cfg["zero_optimization"]["overlap_comm"] is True, name


def test_paper_lora_configs_keep_the_base_whole_on_each_gpu():
    """Every paper config trains LoRA adapters on a base whose bf16 weights fit one GPU
    (8B at most): ZeRO-2, since ZeRO-3 would all-gather the frozen base every micro-batch."""
    import yaml

    paths = sorted((REPO / "configs" / "paper").glob("*.yaml"))
    assert len(paths) >= 5, paths  # the paper's five models, at least
    for path in paths:
        train = yaml.safe_load(path.read_text())["train"]
        assert train.get("lora"), path.name
        assert train["deepspeed"] == "configs/deepspeed/zero2.json", (path.name, train["deepspeed"])
