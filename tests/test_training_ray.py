"""Ray Train with 2 CPU workers: forget with LoRA over plain DDP, ZeRO-2 sft (with a failure
and resume), ZeRO-3 sft (must land on the ZeRO-2 weights). All three jobs train in ONE Ray
Train run (one worker group, as the pipeline trains a model family's jobs): a worker-group
start costs ~20-45 s here, so the run pays it twice (the start and the restart after the
injected failure) instead of four times. The DeepSpeed CPU comm op compiles once (~45 s)
into TORCH_EXTENSIONS_DIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_support import make_corpus, make_job, mean_ce_by_class
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.training import SubsetSpec, run_training, run_trainings
from orchestrator.training.loop import FAIL_MARKER

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Same optimisation in every run so that sft and forget are comparable step for step.
COMMON = {"num_workers": 2, "micro_batch_size": 4, "grad_accum_steps": 2, "epochs": 4.0,
          "lr": 1e-2, "warmup_ratio": 0.0, "eval_every": 4, "lambda": {"t_max": 0.5}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("train_ray")
    base = tiny_base
    data = make_corpus(tmp / "corpus.parquet", n=64)
    valid = make_corpus(tmp / "valid.parquet", n=16, seed=1, noise=0.0)
    return tmp, base, data, valid


def _job(assets, name, method, **kw):
    tmp, base, data, valid = assets
    job = make_job(tmp, base, data, method=method, name=name, **{**COMMON, **kw})
    job.validation_path = str(valid)
    return job


def _generates(model_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 7)


LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def trained(ray_local, assets):
    """LoRA-DDP forget, ZeRO-2 sft (fails once after its step-4 checkpoint) and ZeRO-3 sft, in
    this order, in one worker group: the restart skips the finished LoRA job, resumes ZeRO-2
    and then trains ZeRO-3 from scratch."""
    tmp = assets[0]
    lora = _job(assets, "lora-ddp", "forget", deepspeed=None, lora=LORA, epochs=1.0,
                max_failures=1)
    lora.subset = SubsetSpec(fraction=0.5, seed=3)  # every rank reads only the subset's rows
    z2 = _job(assets, "sft-z2", "sft", deepspeed="configs/deepspeed/zero2.json",
              checkpoint_every=4, max_failures=1)
    z2.test_hooks = {"_fail_once_at_step": 4}
    z3 = _job(assets, "sft-z3", "sft", deepspeed="configs/deepspeed/zero3.json", max_failures=1)
    jobs = {"lora": lora, "z2": z2, "z3": z3}
    results = run_trainings(list(jobs.values()), run_name="ray-group",
                            storage_path=str(tmp / "ray-group"))
    return jobs, dict(zip(jobs, results, strict=True))


def test_zero2_sft_trains_resumes_and_exports(trained, assets):
    jobs, results = trained
    job, result = jobs["z2"], results["z2"]
    _, base, data, _ = assets
    # 64 rows / 2 workers = 32 per rank: 8 micro-batches of 4 per epoch, 2 per optimizer
    # step, so 4 steps an epoch and 16 in 4 epochs.
    assert result.steps == 16 == result.metrics["planned_steps"]
    assert (Path(job.storage_path) / job.run_name / FAIL_MARKER).exists()  # it did fail once
    assert result.metrics["resumed_from_step"] == 4
    before, after = mean_ce_by_class(base, data), mean_ce_by_class(result.export_dir, data)
    assert after[1] < before[1] - 0.5  # the training loss fell
    assert result.metrics["val_loss"] < before[1] - 0.5
    assert result.metrics["engine"] == "deepspeed" and result.metrics["zero_stage"] == 2
    on_disk = json.loads(Path(result.metrics_path).read_text())
    assert on_disk["steps"] == 16 and on_disk["neg_loss"] is None  # no negatives under sft
    _generates(result.export_dir)
    again = run_training(job)  # the finished export is returned, no Ray Train run
    assert again.cached and again.export_dir == result.export_dir


def test_zero3_sft_matches_zero2_after_its_resume(trained):
    """Same data, ranks and steps: ZeRO-3 (head weight gathered as an external parameter)
    must land on the ZeRO-2 weights, which also went through a failure and a resume."""
    _, results = trained
    z2, z3 = results["z2"], results["z3"]
    assert z3.metrics["zero_stage"] == 3 and z3.metrics["resumed_from_step"] == 0
    a = load_file(str(Path(z2.export_dir) / "model.safetensors"))
    b = load_file(str(Path(z3.export_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_forget_with_lora_over_ddp_exports_a_merged_model(trained, assets):
    _, base, _, _ = assets
    _, results = trained
    result = results["lora"]
    # 32 of 64 rows: 16 per rank, 4 micro-batches of 4, 2 per step.
    assert result.metrics["engine"] == "ddp" and result.steps == 2
    assert result.metrics["resumed_from_step"] == 0  # finished before the failure: not redone
    assert result.metrics["lambda"] > 0 and result.metrics["neg_loss"] > result.metrics["pos_loss"]
    exported = load_file(str(Path(result.export_dir) / "model.safetensors"))
    original = load_file(str(Path(base) / "model.safetensors"))
    assert exported.keys() == original.keys()  # merged: no lora_A / lora_B / base_layer keys
    assert not (Path(result.export_dir) / "adapter_config.json").exists()
    changed = [k for k in original if not torch.equal(exported[k], original[k])]
    assert any("q_proj" in k for k in changed)  # the adapters' delta was merged in
    assert "model.embed_tokens.weight" not in changed  # not a LoRA target
    _generates(result.export_dir)
