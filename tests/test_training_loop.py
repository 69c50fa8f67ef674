"""The training loss arithmetic and the plain (no-Ray) loop: normalisation, ignore, NaN, resume."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_training_support import make_corpus, make_job, mean_ce_by_class, tiny_spec

from orchestrator.method.objective import forgetting_objective
from orchestrator.models import load_model
from orchestrator.training import MlflowTarget, NonFiniteLossError, SubsetSpec, run_training_local
from orchestrator.training.collate import collate
from orchestrator.training.loss import Normalizer, TokenLossModel, objective_for_batch, step_counts


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("train_loop")
    base = tiny_base
    data = make_corpus(tmp / "corpus.parquet", n=32)
    return tmp, base, data


def _rows(data: Path, idx) -> tuple[list[np.ndarray], list[np.ndarray]]:
    t = pq.read_table(data)
    ids = [np.array(t["input_ids"][i].as_py()) for i in idx]
    cls = [np.array(t["token_class"][i].as_py(), np.int8) for i in idx]
    return ids, cls


def _loss_model(base: str) -> TokenLossModel:
    torch.manual_seed(0)
    return TokenLossModel(load_model(base, tiny_spec()), chunk_size=16).train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["forget", "ignore", "sft"])
def test_global_normalisation_equals_big_batch_mean(assets, mode):
    """2 simulated ranks x 2 micro-batches, engine averaging (÷gas, mean over ranks) applied
    by hand: the gradient must equal the global-token-mean objective of one big batch."""
    _, base, data = assets
    world, gas, micro, lam = 2, 2, 2, 0.3
    ref = _loss_model(base)
    ids, cls = _rows(data, range(world * gas * micro))
    big = collate(ids, cls, pad_id=1)
    ce, c = ref(big["input_ids"], big["attention_mask"], big["labels"], big["target_class"])
    forgetting_objective(ce, c, mode=mode, lam=lam).loss.backward()
    expected = _grads(ref)

    batches = [collate(ids[k * micro:(k + 1) * micro], cls[k * micro:(k + 1) * micro], 1)
               for k in range(world * gas)]
    counts = step_counts(batches)  # = the all_reduce of per-rank counts
    per_rank, per_rank_micro = [], []
    for r in range(world):
        for normalization, sink in (("global", per_rank), ("micro_batch", per_rank_micro)):
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            norm = Normalizer(normalization, world, gas, float(counts[0]), float(counts[1]))
            for b in batches[r * gas:(r + 1) * gas]:
                ce, c = model(b["input_ids"], b["attention_mask"], b["labels"], b["target_class"])
                out = objective_for_batch(ce, c, mode=mode, lam=lam, negative_term="ascent",
                                          norm=norm)
                (out.loss / gas).backward()  # what DeepSpeed's engine.backward does
            sink.append(_grads(model))
    averaged = {n: sum(g[n] for g in per_rank) / world for n in expected}
    for n, g in expected.items():
        torch.testing.assert_close(averaged[n], g, rtol=1e-4, atol=1e-6, msg=n)
    # The paper's per-micro-batch means are a different estimator (so the test can fail).
    micro_avg = {n: sum(g[n] for g in per_rank_micro) / world for n in expected}
    assert max(float((micro_avg[n] - g).abs().max()) for n, g in expected.items()) > 1e-4


def test_ignore_gives_negative_tokens_zero_gradient(assets):
    _, base, data = assets
    ids, cls = _rows(data, range(6))
    batch = collate(ids, cls, pad_id=1)
    neg = batch["target_class"] == -1
    assert int(neg.sum()) > 5
    results = {}
    for mode in ("ignore", "forget"):
        for relabel in (False, True):
            model = _loss_model(base)
            b = dict(batch)
            if relabel:  # a different target at every negative position
                b["labels"] = torch.where(neg, (batch["labels"] + 7) % 300, batch["labels"])
            ce, c = model(b["input_ids"], b["attention_mask"], b["labels"], b["target_class"])
            ce.retain_grad()
            forgetting_objective(ce, c, mode=mode, lam=0.25).loss.backward()
            results[mode, relabel] = (_grads(model), ce.grad, c)
    grads, ce_grad, c = results["ignore", False]
    assert torch.all(ce_grad[c == -1] == 0) and torch.all(ce_grad[c == 1] > 0)
    for n, g in grads.items():  # what the negatives' targets are cannot matter
        assert torch.equal(g, results["ignore", True][0][n]), n
    forget_diff = max(float((results["forget", False][0][n] - results["forget", True][0][n])
                            .abs().max()) for n in grads)
    assert forget_diff > 1e-6 and torch.all(results["forget", False][1][c == -1] < 0)


def test_nan_loss_stops_with_the_step(assets):
    tmp, base, data = assets
    job = make_job(tmp, base, data, method="forget", name="nan", max_steps=5)
    job.test_hooks = {"_nan_at_step": 3}
    with pytest.raises(NonFiniteLossError, match="non-finite loss at optimizer step 3 of 5"):
        run_training_local(job)
    skip = make_job(tmp, base, data, method="forget", name="nan_skip", max_steps=5,
                    on_nonfinite="skip")
    skip.test_hooks = {"_nan_at_step": 3}
    result = run_training_local(skip)
    assert result.steps == 5 and result.metrics["skipped_micro_batches"] == 1


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.5,
                                          "target_modules": ["q_proj", "v_proj"]}],
                         ids=["full", "lora-dropout"])
def test_local_resume_matches_an_uninterrupted_run(assets, lora):
    """Engine state, LR schedule, data position and the random streams (LoRA dropout draws
    the same masks after the resume: rng_state.py) survive a failure exactly."""
    tmp, base, data = assets
    kw = {"method": "forget", "max_steps": 6, "checkpoint_every": 2, "micro_batch_size": 4,
          "grad_accum_steps": 2, "warmup_ratio": 0.3, "lora": lora}
    tag = "lora" if lora else "full"
    straight = run_training_local(make_job(tmp, base, data, name=f"straight-{tag}", **kw))
    failing = make_job(tmp, base, data, name=f"resumed-{tag}", **kw)
    failing.test_hooks = {"_fail_once_at_step": 4}
    with pytest.raises(RuntimeError, match="injected failure after the checkpoint of step 4"):
        run_training_local(failing)
    resumed = run_training_local(failing)
    assert resumed.steps == straight.steps == 6 and not resumed.cached
    assert resumed.metrics["resumed_from_step"] == 4 and straight.metrics["resumed_from_step"] == 0
    a = load_file(str(Path(straight.export_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.export_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert run_training_local(failing).cached  # _SUCCESS.json short-circuits a rerun


def test_a_deleted_output_folder_retrains_instead_of_resuming_old_checkpoints(assets):
    """Checkpoints live in the run's storage (a training session's outlives the stage
    folder): deleting the job's output folder to force a retrain must start from step 0."""
    tmp, base, data = assets
    kw = {"method": "sft", "max_steps": 4, "checkpoint_every": 2, "micro_batch_size": 4}
    job = make_job(tmp, base, data, name="deleted-out", **kw)
    job.test_hooks = {"_fail_once_at_step": 2}
    with pytest.raises(RuntimeError, match="injected failure after the checkpoint of step 2"):
        run_training_local(job)
    assert any(Path(job.storage_path).rglob("checkpoint_*"))
    shutil.rmtree(job.output_dir)
    again = run_training_local(job)
    assert again.metrics["resumed_from_step"] == 0 and again.steps == 4


def test_forget_raises_negative_ce_over_sft_after_the_same_steps(assets):
    tmp, base, data = assets
    kw = {"epochs": 6.0, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 1e-2,
          "lambda": {"t_max": 0.5}}
    sft = run_training_local(make_job(tmp, base, data, method="sft", name="cmp-sft", **kw))
    forget = run_training_local(make_job(tmp, base, data, method="forget", name="cmp-forget", **kw))
    assert sft.steps == forget.steps == 24  # 32 rows: 8 micro-batches, 4 steps an epoch
    before = mean_ce_by_class(base, data)
    ce_sft, ce_forget = mean_ce_by_class(sft.export_dir, data), mean_ce_by_class(
        forget.export_dir, data)
    assert ce_sft[1] < before[1] - 1.0 and ce_forget[1] < before[1] - 1.0  # both learned
    assert ce_forget[-1] > ce_sft[-1] + 1.0, (ce_forget, ce_sft)  # negatives pushed up
    assert abs(ce_forget[1] - ce_sft[1]) < 0.25 * ce_sft[1], (ce_forget, ce_sft)
    assert forget.metrics["neg_loss"] > forget.metrics["pos_loss"] and forget.metrics["lambda"] > 0


def test_subset_validation_and_mlflow_curves(assets):
    from mlflow.tracking import MlflowClient

    tmp, base, data = assets
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lethe-test", artifact_location=str(tmp / "artifacts"))
    parent = client.create_run(exp, run_name="parent").info.run_id
    job = make_job(tmp, base, data, method="forget", name="tracked", eval_every=2)
    job.subset = SubsetSpec(size=16, seed=0)
    job.validation_path = str(make_corpus(tmp / "valid.parquet", n=8, seed=5, noise=0.0))
    job.mlflow = MlflowTarget(tracking_uri=uri, experiment="lethe-test", parent_run_id=parent,
                              run_name="tiny-forget", tags={"method": "forget"})
    result = run_training_local(job)
    assert result.steps == 2  # 16 of 32 rows, micro-batches of 8
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_name for r in runs] == ["tiny-forget"]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "forget"
    assert run.data.params["train.micro_batch_size"] == "8"
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [2] and val[0].value == pytest.approx(result.metrics["val_loss"])
    assert {"pos_loss", "neg_loss", "lambda", "lr", "tokens_per_s", "grad_norm",
            "step_time_s"} <= set(run.data.metrics)


def test_deepspeed_zero2_step_matches_plain_torch(assets):
    """DeepSpeed divides each micro-batch loss by gas and clips like the plain path: with the
    same data, both engines land on the same weights (world size 1, fp32)."""
    tmp, base, data = assets
    kw = {"method": "forget", "max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 2,
          "max_grad_norm": 0.5, "lambda": {"t_max": 0.5}}
    plain = run_training_local(make_job(tmp, base, data, name="eq-plain", **kw))
    ds = run_training_local(make_job(tmp, base, data, name="eq-ds",
                                     deepspeed="configs/deepspeed/zero2.json", **kw))
    assert (plain.metrics["engine"], ds.metrics["engine"]) == ("ddp", "deepspeed")
    a = load_file(str(Path(plain.export_dir) / "model.safetensors"))
    b = load_file(str(Path(ds.export_dir) / "model.safetensors"))
    original = load_file(str(Path(base) / "model.safetensors"))
    assert not torch.equal(a["model.norm.weight"], original["model.norm.weight"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ds.metrics["grad_norm"] == pytest.approx(plain.metrics["grad_norm"], rel=1e-3)
