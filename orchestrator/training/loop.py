"""The per-worker training loop (plain: runs inside Ray Train or alone with world size 1).

One optimizer step = `grad_accum` micro-batches on every rank. Before a step's first
micro-batch the step's class counts are all-reduced (global normalisation), so nothing per
step depends on the corpus size. Every rank reports to the context equally often (Ray
Train's report is a barrier): at evaluation and checkpoint steps, every tenth of the run, and
at the end; MLflow curves (rank 0) are logged at finer log steps.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.config import ModelSpec, TrainConfig
from orchestrator.method.schedules import lambda_at
from orchestrator.models import load_model, load_tokenizer, resolve_dtype
from orchestrator.training import distributed
from orchestrator.training.checkpoint_policy import CheckpointPolicy
from orchestrator.training.collate import IGNORE_INDEX, collate
from orchestrator.training.context import LocalContext, RayContext, make_context
from orchestrator.training.data import StepPlan, TokenRows, read_table, rows_from_table
from orchestrator.training.deepspeed_setup import (
    DDPEngine,
    DeepSpeedEngine,
    build_optimizer,
    fill_deepspeed_config,
)
from orchestrator.training.export import (
    apply_lora,
    gather_state_dict,
    save_hf_folder,
    write_json_atomic,
)
from orchestrator.training.loss import Normalizer, TokenLossModel, objective_for_batch, step_counts
from orchestrator.training.mlflow_logging import TrainingCurves

STATE_FILE = "trainer_state.json"
FAIL_MARKER = "_injected_failure_done"


class NonFiniteLossError(RuntimeError):
    """The loss was nan/inf and train.on_nonfinite is "stop"."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    skipped_micro_batches: int = 0  # non-finite micro-batches skipped (on_nonfinite="skip")
    tokens: int = 0  # real (non-pad) tokens processed, all ranks
    train_seconds: float = 0.0
    world_size: int = 1
    mlflow_run_id: str | None = None
    job: str | None = None  # run name of the job (several jobs share one Ray Train run)


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    # Through the one helper: it moves host tensors to the current CUDA device under NCCL
    # (which has no CPU backend) and back, so every call site works with any backend.
    return distributed.all_reduce(t, op=op)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_engine(config: dict[str, Any], spec: ModelSpec, train: TrainConfig, plan: StepPlan,
                 world: int, device: torch.device) -> DeepSpeedEngine | DDPEngine:
    dtype = resolve_dtype(train.dtype, str(device))
    ds_raw = config.get("deepspeed_config")
    # DeepSpeed keeps fp32 master weights itself: load in the compute dtype. Plain torch keeps
    # fp32 weights and autocasts (pure bf16 weights would lose small AdamW updates).
    load_dtype = dtype if ds_raw is not None else torch.float32
    _seed(train.seed)  # identical LoRA init on every rank
    model = load_model(config["base_model_path"], spec, dtype=load_dtype, device=str(device))
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.lora is not None:
        model = apply_lora(model, train.lora.model_dump())
    loss_model = TokenLossModel(model, chunk_size=train.loss_chunk_size).to(device)
    opt, sched = build_optimizer(loss_model, train.lr, train.weight_decay, plan.total_updates,
                                 train.warmup_ratio, device)
    if ds_raw is not None:
        ds_cfg = fill_deepspeed_config(ds_raw, micro=train.micro_batch_size,
                                       gas=train.grad_accum_steps, world=world,
                                       max_grad_norm=train.max_grad_norm, dtype=dtype)
        return DeepSpeedEngine(loss_model, ds_cfg, opt, sched)
    autocast = dtype if dtype != torch.float32 else None
    return DDPEngine(loss_model, opt, sched, gas=train.grad_accum_steps,
                     max_grad_norm=train.max_grad_norm, device=device, autocast_dtype=autocast)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _dummy_batch(device: torch.device) -> dict[str, torch.Tensor]:
    """One target token: a finite zero-weight backward that keeps every rank in lockstep."""
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
            "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
            "labels": torch.tensor([[0, IGNORE_INDEX]], device=device),
            "target_class": torch.tensor([[1, 0]], dtype=torch.int8, device=device)}


def load_validation(config: dict[str, Any], rank: int, world: int) -> TokenRows | None:
    path = config.get("validation_path")
    if not path:
        return None
    rows = rows_from_table(read_table(path, ["sample_id", "input_ids", "response_mask"]),
                           "response_mask")
    return rows.take(np.arange(rank, len(rows), world))


def validate(engine, rows: TokenRows | None, micro: int, pad_id: int,
             device: torch.device) -> float | None:
    """Mean CE over response tokens of the clean held-out rows, over all ranks.

    Every rank runs the same number of forwards (ZeRO-3 forwards are collective); a rank
    with fewer rows repeats its first batch and does not count it.
    """
    if rows is None:
        return None
    n_batches = torch.tensor([math.ceil(len(rows) / micro)], dtype=torch.long)
    n_batches = int(_all_reduce(n_batches, dist.ReduceOp.MAX))
    totals = torch.zeros(2, dtype=torch.float64)
    engine.train(False)
    with torch.no_grad():
        for b in range(n_batches):
            idx = np.arange(b * micro, min((b + 1) * micro, len(rows)))
            real = len(idx) > 0
            idx = idx if real else np.arange(min(micro, len(rows)))
            pairs = [rows.row(i) for i in idx]
            batch = _to(collate([p[0] for p in pairs], [p[1] for p in pairs], pad_id), device)
            ce, _ = engine.forward(batch)
            if real:
                totals += torch.tensor([float(ce.double().sum()), ce.numel()], dtype=torch.float64)
    engine.train(True)
    totals = _all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


class MicroBatchStream:
    """The micro-batches of optimizer step s: stream items [s*gas, (s+1)*gas) of the plan.

    A step's position follows from s alone, so a resumed run skips exactly the consumed
    micro-batches of its epoch. Each epoch's order is computed once, not per step.
    """

    def __init__(self, rows: TokenRows, plan: StepPlan, seed: int, pad_id: int) -> None:
        self.rows, self.plan, self.seed, self.pad_id = rows, plan, seed, pad_id
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.plan.epoch_order(epoch, self.seed)
        return self._order

    def for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        gas = self.plan.grad_accum
        out = []
        for k in range(step * gas, (step + 1) * gas):
            epoch, position = self.plan.locate(k)
            pairs = [self.rows.row(i)
                     for i in self.plan.micro_batch_rows(self._order_of(epoch), position)]
            out.append(collate([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id))
        return out


def _log_every(total: int) -> int:
    return max(1, total // 50)


def _report_every(total: int) -> int:
    # A `ray.train.report` waits until the controller takes the previous one, and the
    # controller polls about every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a
    # report per log step capped a 75-step tiny run at ~0.5 steps/s. MLflow curves keep the
    # log-step resolution (rank 0 logs them directly); Ray gets ~10 progress reports plus
    # every evaluation and checkpoint step.
    return max(1, total // 10)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train one model, or several one after the other (`config["jobs"]`: a list of such
    configs sharing this worker group). A config is TrainJob.to_dict() plus what the driver
    resolved: `backend` ("ray" or local), `deepspeed_config` (dict or None),
    `keep_sample_ids`. Returns the (last) job's final metrics (also reported and, on rank 0,
    written to each job's metrics.json)."""
    _quiet_per_report_logs()
    jobs = config.get("jobs") or [config]
    ctx = make_context(jobs[0])
    train = TrainConfig.model_validate(jobs[0]["train"])
    device = ctx.device(train.use_gpu)
    ctx.init_process_group("nccl" if device.type == "cuda" else "gloo")
    final: dict[str, Any] = {}
    try:
        for job in jobs:
            if _job_finished(job):  # exported before a restart of this worker group
                continue
            ctx.use_job(job)
            spec = ModelSpec.model_validate(job["model"])
            final = _train(job, ctx, spec, TrainConfig.model_validate(job["train"]), device)
            _release_memory(device)
        return final
    finally:
        ctx.close()


def _job_finished(config: dict[str, Any]) -> bool:
    """metrics.json is written by rank 0 after the export, before the closing barrier."""
    return (Path(config["output_dir"]) / "metrics.json").is_file()


def _release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _quiet_per_report_logs() -> None:
    """Ray Train V2 logs every `ray.train.report` (the whole metrics dict) at INFO from each
    worker to the driver's console; the curves already go to MLflow and the progress line,
    so keep only its warnings."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # no Ray (a GPU box running the plain loop): nothing to quiet
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def _train(config: dict[str, Any], ctx: LocalContext | RayContext, spec: ModelSpec,
           train: TrainConfig, device: torch.device) -> dict[str, Any]:
    t_start = time.time()
    rank, world = ctx.rank, ctx.world_size
    micro, gas, method = train.micro_batch_size, train.grad_accum_steps, config["method"]
    rows = ctx.train_rows()
    # Equal row counts on every rank, or the ranks would run different numbers of steps.
    n_rows = int(_all_reduce(torch.tensor([len(rows)]), dist.ReduceOp.MIN))
    rows = rows.take(np.arange(n_rows))
    plan = StepPlan.build(n_rows, micro, gas, train.epochs, train.max_steps)
    total = plan.total_updates
    pad_id = load_tokenizer(spec, config["base_model_path"]).pad_token_id or 0
    val_rows = load_validation(config, rank, world)
    engine = build_engine(config, spec, train, plan, world, device)
    # from_pretrained returns eval mode, and without a validation split nothing else would
    # switch it: gradient checkpointing (HF checks self.training) and dropout would be off.
    engine.train(True)
    _seed(train.seed + 1000 * rank)  # distinct dropout streams per rank

    state = TrainerState(world_size=world, job=config["run_name"])
    resumed_from = 0
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            saved = TrainerState(**json.loads((ckpt_dir / STATE_FILE).read_text()))
        if ckpt_dir is not None and saved.job not in (None, config["run_name"]):
            ckpt_dir = None  # the latest checkpoint of this worker group is an earlier job's
        if ckpt_dir is not None:
            if saved.world_size != world:
                raise RuntimeError(f"checkpoint {ckpt_dir} was written by {saved.world_size} "
                                   f"workers, this run has {world}: ZeRO shards do not re-split")
            engine.load(ckpt_dir)
            state, resumed_from = saved, saved.step
    curves = TrainingCurves(config.get("mlflow"), rank=rank, run_name=config["run_name"],
                            params={"method": method, **_flat("train", config["train"])},
                            resume_run_id=state.mlflow_run_id)
    state.mlflow_run_id = curves.run_id

    # Every report carries val_loss when a validation set exists (Tune's strict metric check
    # rejects a result without it): fresh at eval steps, the latest value otherwise.
    val_loss, val_step = None, state.step
    if val_rows is not None:
        val_loss = validate(engine, val_rows, micro, pad_id, device)

    t_ready = time.time()
    lam_cfg = train.lambda_
    log_every, report_every = _log_every(total), _report_every(total)
    # Running sums since the last report: pos CE, n_pos, neg CE, n_neg, tokens.
    acc = torch.zeros(5, dtype=torch.float64)
    interval_start, interval_steps, last_norm, lam = time.perf_counter(), 0, None, 0.0
    metrics: dict[str, Any] = {}
    stream = MicroBatchStream(rows, plan, train.seed, pad_id)
    policy = CheckpointPolicy(train.checkpoint_every, train.checkpoint_every_minutes)
    while state.step < total:
        step = state.step
        batches = stream.for_step(step)
        counts = _all_reduce(step_counts(batches))
        norm = Normalizer(train.normalization, world, gas, float(counts[0]), float(counts[1]))
        lam = (lambda_at(step, total, lam_cfg.schedule, lam_cfg.t_max, lam_cfg.t_min)
               if method == "forget" else 0.0)
        for j, batch in enumerate(batches):
            batch = _to(batch, device)
            ce, cls = engine.forward(batch)
            out = objective_for_batch(ce, cls, mode=method, lam=lam,
                                      negative_term=train.negative_term, norm=norm)
            loss = out.loss
            if config.get("_nan_at_step") == step + 1:  # test hook: poison one step
                loss = loss * float("nan")
            bad = _all_reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]),
                              dist.ReduceOp.MAX)
            if bad.item():
                if train.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss at optimizer step {step + 1} of {total} (micro-batch "
                        f"{j + 1} of {gas}, method {method}, lambda {lam:.4g}); set "
                        "train.on_nonfinite=skip to skip such micro-batches")
                state.skipped_micro_batches += 1
                dce, _ = engine.forward(_to(_dummy_batch(device), device))
                loss = dce.sum() * 0.0
            else:
                acc += torch.tensor([float(out.pos_loss) * out.n_pos if out.n_pos else 0.0,
                                     out.n_pos,
                                     float(out.neg_loss) * out.n_neg if out.n_neg else 0.0,
                                     out.n_neg, float(batch["attention_mask"].sum())],
                                    dtype=torch.float64)
            engine.backward(loss)
            grad_norm = engine.micro_step(boundary=j == gas - 1)
        last_norm = grad_norm
        state.step += 1
        interval_steps += 1

        done = state.step == total
        # Every N steps and at least every M minutes (a failure never loses more than that);
        # the time trigger is agreed over the ranks, so every rank takes this collective.
        ckpt_now = policy.due(state.step, done, agree=lambda due: bool(
            _all_reduce(torch.tensor([float(due)]), dist.ReduceOp.MAX).item()))
        eval_now = val_rows is not None and (done or (train.eval_every and
                                                      state.step % train.eval_every == 0))
        if not (done or ckpt_now or eval_now or state.step % log_every == 0):
            continue
        sums = _all_reduce(acc.clone())
        elapsed = time.perf_counter() - interval_start
        state.tokens += int(sums[4])
        state.train_seconds += elapsed
        metrics = {
            "step": state.step, "total_steps": total, "epoch": state.step * gas / plan.micro_per_epoch,
            "pos_loss": float(sums[0] / sums[1]) if sums[1] else float("nan"),
            "neg_loss": float(sums[2] / sums[3]) if sums[3] else float("nan"),
            "lambda": lam, "lr": engine.lr(),
            "grad_norm": last_norm if last_norm is not None else float("nan"),
            "tokens_per_s": float(sums[4]) / elapsed if elapsed > 0 else float("nan"),
            "step_time_s": elapsed / interval_steps,
            "skipped_micro_batches": state.skipped_micro_batches,
        }
        if eval_now:
            val_loss, val_step = validate(engine, val_rows, micro, pad_id, device), state.step
        if val_rows is not None:
            metrics.update(val_loss=val_loss, val_loss_step=val_step)
        stale = set() if eval_now else {"val_loss"}  # MLflow gets each val_loss once
        curves.log({k: v for k, v in metrics.items()
                    if v is not None and k not in stale | {"total_steps", "val_loss_step"}},
                   step=state.step)
        if ckpt_now:
            with tempfile.TemporaryDirectory(prefix="lethe-ckpt-") as tmp:
                engine.save(Path(tmp))
                if rank == 0:
                    write_json_atomic(Path(tmp) / STATE_FILE, asdict(state))
                ctx.report(metrics, Path(tmp), state.step)
            policy.saved()
            _maybe_inject_failure(config, state.step, rank)
        elif done or eval_now or state.step % report_every == 0:
            ctx.report(metrics, None, state.step)
        acc.zero_()
        interval_start, interval_steps = time.perf_counter(), 0

    if not metrics and val_loss is not None:  # resumed at the last step: nothing trained
        metrics = {"val_loss": val_loss, "val_loss_step": val_step}
    metrics["resumed_from_step"] = resumed_from
    metrics["timing"] = {"start": t_start, "ready": t_ready, "trained": time.time()}
    final = _finish(config, engine, spec, train, device, state, metrics, rank)
    curves.finish()
    return final


def _finish(config, engine, spec, train, device, state, metrics, rank) -> dict[str, Any]:
    """Export on rank 0 (after a collective gather for ZeRO-3) and write metrics.json."""
    zero3 = isinstance(engine, DeepSpeedEngine) and engine.stage == 3
    full = gather_state_dict(engine.module, zero3, trainable_only=train.lora is not None)
    out_dir = Path(config["output_dir"])
    final = {**metrics, "steps": state.step, "tokens": state.tokens,
             "train_seconds": state.train_seconds,
             "mean_tokens_per_s": state.tokens / state.train_seconds if state.train_seconds else None,
             "skipped_micro_batches": state.skipped_micro_batches, "engine": engine.kind,
             "zero_stage": engine.stage if isinstance(engine, DeepSpeedEngine) else None}
    if rank == 0:
        dtype = next(iter(full.values())).dtype if full else torch.float32
        save_hf_folder(full, base_path=config["base_model_path"], spec=spec, train=train,
                       dtype=dtype, out_dir=out_dir / "model")
        final["timing"] = {**final.get("timing", {}), "end": time.time()}
        write_json_atomic(out_dir / "metrics.json", final)
    # Long-timeout gloo barrier: rank 0 may write for minutes; an NCCL wait would time out.
    distributed.barrier(long_wait=True)
    return final


def _maybe_inject_failure(config: dict[str, Any], step: int, rank: int) -> None:
    """Test hook `_fail_once_at_step`: every rank raises once, right after that checkpoint."""
    if config.get("_fail_once_at_step") != step:
        return
    marker = Path(config["storage_path"]) / config["run_name"] / FAIL_MARKER
    already = marker.exists()
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 writes the marker
    if already:
        return
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    raise RuntimeError(f"injected failure after the checkpoint of step {step}")


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        out.update(_flat(key, v) if isinstance(v, dict) else {key: v})
    return out
