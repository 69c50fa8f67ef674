"""The training recipe: one job, from its rows to an exported model, on one worker.

`Trainer(job, ctx)` follows the recipe shape of torchtune's single-device recipes:
`setup()` (rows, plan, model, engine, resume, tracking), `train()` (the optimizer steps),
`_loss_step()` (one micro-batch), `validate()`, `save_checkpoint()` and `export()`. It makes
no torch.distributed or DeepSpeed call itself: the `Strategy` owns them (engine steps and
the few collectives), the worker context (`ctx`) owns rows, reports, checkpoints to resume
from and the test-only fault hooks.

One optimizer step = `grad_accum` micro-batches on every rank. Before a step's first
micro-batch the step's class counts are summed over the ranks (global normalisation), so
nothing per step depends on the corpus size. Every rank reports to the context equally
often (Ray Train's report is a barrier): at evaluation and checkpoint steps, every tenth of
the run, and at the end; MLflow curves (rank 0) are logged at finer log steps.

The state a checkpoint carries, the running sums and the worker's job are in
trainer_state.py (re-exported here).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.method.schedules import lambda_at
from orchestrator.models import load_model, load_tokenizer
from orchestrator.training.batches import (
    MicroBatchStream,
    dummy_batch,
    load_validation,
    validation_batches,
)
from orchestrator.training.checkpoint_policy import CheckpointPolicy
from orchestrator.training.context import WorkerContext
from orchestrator.training.data import StepPlan
from orchestrator.training.export import apply_lora, save_hf_folder, write_json_atomic
from orchestrator.training.loss import (
    Normalizer,
    TokenLossModel,
    objective_for_batch,
    row_class_counts,
    step_counts,
    target_rows,
)
from orchestrator.training.mlflow_logging import TrainingCurves, training_params
from orchestrator.training.rng_state import load_rng_state, save_rng_state
from orchestrator.training.strategy import Strategy
from orchestrator.training.trainer_state import (
    ATTEMPT_FILE,
    STATE_FILE,
    NonFiniteLossError,
    StepSums,
    TrainerState,
    ValidationSums,
    WorkerJob,
)

__all__ = ["ATTEMPT_FILE", "STATE_FILE", "NonFiniteLossError", "StepSums", "Trainer",
           "TrainerState", "ValidationSums", "WorkerJob", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log_every(total: int) -> int:
    return max(1, total // 50)


def _report_every(total: int) -> int:
    # A `ray.train.report` waits until the controller takes the previous one, and the
    # controller polls about every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a
    # report per log step capped a 75-step tiny run at ~0.5 steps/s. MLflow curves keep the
    # log-step resolution (rank 0 logs them directly); Ray gets ~10 progress reports plus
    # every evaluation and checkpoint step.
    return max(1, total // 10)


class Trainer:
    """Trains one job on this worker; `setup()` then `train()` (which exports)."""

    def __init__(self, job: WorkerJob, ctx: WorkerContext) -> None:
        self.job, self.ctx = job, ctx
        self.train_cfg, self.method = job.train, job.job.method
        self.state = TrainerState(world_size=ctx.world_size, job=job.job.run_name)
        self.resumed_from = 0
        self.val_loss: float | None = None
        self.val_step = 0
        self.timing: dict[str, float] = {}
        self._ce_acc: torch.Tensor | None = None  # [pos, neg] CE sums since the last report

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Rows, step plan, model and engine, resume, tracking; the first validation."""
        self.timing["start"] = time.time()
        ctx, t = self.ctx, self.train_cfg
        self.strategy = Strategy(ctx.rank, ctx.world_size, ctx.device(t.use_gpu), t,
                                 self.job.deepspeed_config)
        rows = ctx.train_rows()
        # Equal row counts on every rank, or the ranks would run different numbers of steps.
        n_rows = self.strategy.min_over_ranks(len(rows))
        rows = rows.take(np.arange(n_rows))
        self.plan = StepPlan.build(n_rows, t.micro_batch_size, t.grad_accum_steps, t.epochs,
                                   t.max_steps)
        self.pad_id = load_tokenizer(self.job.spec, self.job.job.base_model_path).pad_token_id or 0
        self.val_rows = load_validation(self.job.job.validation_path, ctx.rank, ctx.world_size)
        self._setup_model()
        seed_everything(t.seed + 1000 * ctx.rank)  # distinct dropout streams per rank
        self._resume()
        self.curves = TrainingCurves(self.job.config.get("mlflow"), rank=ctx.rank,
                                     run_name=self.job.job.run_name,
                                     params=training_params(self.method, self.job.job.train),
                                     resume_run_id=self.state.mlflow_run_id)
        self.state.mlflow_run_id = self.curves.run_id
        # Every report carries val_loss when a validation set exists (Tune's strict metric
        # check rejects a result without it): fresh at eval steps, the latest value otherwise.
        self.val_step = self.state.step
        if self.val_rows is not None:
            self.val_loss = self.validate()
        self.stream = MicroBatchStream(rows, self.plan, t.seed, self.pad_id)
        self.timing["ready"] = time.time()

    def _setup_model(self) -> None:
        t = self.train_cfg
        seed_everything(t.seed)  # identical LoRA init on every rank
        model = load_model(self.job.job.base_model_path, self.job.spec,
                           dtype=self.strategy.load_dtype, device=str(self.strategy.device))
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.lora is not None:
            model = apply_lora(model, t.lora.model_dump())
        loss_model = TokenLossModel(model, chunk_size=t.loss_chunk_size).to(self.strategy.device)
        self.vocab_size = loss_model.vocab_size
        self.strategy.prepare(loss_model, self.plan.total_updates)
        # from_pretrained returns eval mode, and without a validation split nothing else would
        # switch it: gradient checkpointing (HF checks self.training) and dropout would be off.
        self.strategy.set_train(True)

    def _resume(self) -> None:
        """Engine and trainer state from this job's latest checkpoint, if there is one and
        it was written for this output folder's current attempt."""
        attempt = self.state.attempt = self._attempt()
        with self.ctx.latest_checkpoint() as ckpt_dir:
            if ckpt_dir is None:
                return
            saved = TrainerState(**json.loads((ckpt_dir / STATE_FILE).read_text()))
            if saved.job not in (None, self.job.job.run_name):
                return  # the latest checkpoint of this worker group is an earlier job's
            # Rank 0 decides for all: only it reads the output folder's attempt file.
            stale = self.strategy.is_rank_0() and saved.attempt not in (None, attempt)
            if self.strategy.any_rank(stale):
                return  # written before the job's output folder was deleted: start afresh
            if saved.world_size != self.ctx.world_size:
                raise RuntimeError(f"checkpoint {ckpt_dir} was written by {saved.world_size} "
                                   f"workers, this run has {self.ctx.world_size}: ZeRO shards "
                                   "do not re-split")
            self.strategy.load(ckpt_dir)
            load_rng_state(ckpt_dir, self.ctx.rank)
            self.state, self.resumed_from = saved, saved.step
            self.state.attempt = attempt  # a checkpoint from before attempts were recorded has None

    def _attempt(self) -> str | None:
        """Rank 0: the id of this attempt at the job's output folder, made on first use."""
        if not self.strategy.is_rank_0():
            return None
        path = Path(self.job.job.output_dir) / ATTEMPT_FILE
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"attempt": uuid.uuid4().hex})
        return str(json.loads(path.read_text())["attempt"])

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, Any]:
        """Optimizer steps until the plan's total, then `export()`; returns final metrics."""
        t, strategy = self.train_cfg, self.strategy
        total, gas = self.plan.total_updates, t.grad_accum_steps
        log_every, report_every = _log_every(total), _report_every(total)
        sums = StepSums()
        interval_start, interval_steps, grad_norm, lam = time.perf_counter(), 0, None, 0.0
        metrics: dict[str, Any] = {}
        policy = CheckpointPolicy(t.checkpoint_every, t.checkpoint_every_minutes)
        while self.state.step < total:
            step = self.state.step
            batches = self.stream.for_step(step)
            local = step_counts(batches)
            counts = strategy.all_reduce({"pos": float(local[0]), "neg": float(local[1])})
            norm = Normalizer(t.normalization, strategy.world_size, gas, counts["pos"],
                              counts["neg"])
            # The paper's lambda ramp (method/schedules.py); only the forget objective uses it.
            lam = (lambda_at(step, total, t.lambda_.schedule, t.lambda_.t_max, t.lambda_.t_min)
                   if self.method == "forget" else 0.0)
            for j, batch in enumerate(batches):
                loss = self._loss_step(target_rows(batch, self.vocab_size), step, j, lam, norm,
                                       sums)
                strategy.backward(loss)
                norm_now = strategy.optimizer_step(boundary=j == gas - 1)
            grad_norm = norm_now
            self.state.step += 1
            interval_steps += 1

            done = self.state.step == total
            # Every N steps and at least every M minutes (a failure never loses more than
            # that); the time trigger is agreed over the ranks (a collective on every rank).
            ckpt_now = policy.due(self.state.step, done, agree=strategy.any_rank)
            eval_now = self.val_rows is not None and (
                done or bool(t.eval_every and self.state.step % t.eval_every == 0))
            if not (done or ckpt_now or eval_now or self.state.step % log_every == 0):
                continue
            elapsed = time.perf_counter() - interval_start
            sums.pos_ce, sums.neg_ce = self._take_ce_sums()
            metrics = self._report_metrics(strategy.all_reduce(sums), elapsed, interval_steps,
                                           lam, grad_norm)
            if eval_now:
                self.val_loss, self.val_step = self.validate(), self.state.step
            if self.val_rows is not None:
                metrics.update(val_loss=self.val_loss, val_loss_step=self.val_step)
            stale = set() if eval_now else {"val_loss"}  # MLflow gets each val_loss once
            self.curves.log({k: v for k, v in metrics.items()
                             if v is not None and k not in stale | {"total_steps", "val_loss_step"}},
                            step=self.state.step)
            if ckpt_now:
                self.save_checkpoint(metrics)
                policy.saved()
                self.ctx.faults.after_checkpoint(self.state.step, strategy.is_rank_0(),
                                                 strategy.barrier)
            elif done or eval_now or self.state.step % report_every == 0:
                self.ctx.report(metrics, None, self.state.step)
            sums = StepSums()
            interval_start, interval_steps = time.perf_counter(), 0

        if not metrics and self.val_loss is not None:  # resumed at the last step: no training
            metrics = {"val_loss": self.val_loss, "val_loss_step": self.val_step}
        metrics["resumed_from_step"] = self.resumed_from
        metrics["timing"] = {**self.timing, "trained": time.time()}
        final = self.export(metrics)
        self.curves.finish()
        return final

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated host batch as the loss model takes it (target rows picked on the
        host, `loss.target_rows`), on the training device."""
        return self.strategy.to_device(target_rows(batch, self.vocab_size))

    def _take_ce_sums(self) -> tuple[float, float]:
        """The CE sums of class +1 / -1 since the last report, read from the device once."""
        acc, self._ce_acc = self._ce_acc, None
        if acc is None:
            return 0.0, 0.0
        pos, neg = acc.tolist()
        return pos, neg

    def _loss_step(self, host: dict[str, torch.Tensor], step: int, j: int, lam: float,
                   norm: Normalizer, sums: StepSums) -> torch.Tensor:
        """The loss of one micro-batch (to backprop); its counts go into `sums`, its
        CE sums stay on the device until the next report (`_take_ce_sums`): a host read per
        micro-batch would wait for the GPU each time. `host` is the micro-batch as
        `target_rows` gives it, still on the host: its token and class counts are read
        there, before it moves.

        A non-finite loss on any rank stops the run (train.on_nonfinite="stop") or is
        replaced on every rank by a zero-weight loss of a stand-in batch, so the ranks keep
        stepping together.
        """
        ce, cls = self.strategy.forward(self.strategy.to_device(host))
        out = objective_for_batch(ce, cls, mode=self.method, lam=lam,
                                  negative_term=self.train_cfg.negative_term, norm=norm,
                                  class_counts=row_class_counts(host["row_class"]))
        loss = self.ctx.faults.poison(out.loss, step)
        # One host sync: the flag is reduced where the loss is, then read.
        if not self.strategy.any_rank(~torch.isfinite(loss.detach())):
            sums.n_pos += out.n_pos
            sums.n_neg += out.n_neg
            sums.tokens += int(host["attention_mask"].sum())
            zero = torch.zeros((), dtype=torch.float64, device=loss.device)
            add = torch.stack([out.pos_loss.double() * out.n_pos if out.n_pos else zero,
                               out.neg_loss.double() * out.n_neg if out.n_neg else zero])
            self._ce_acc = add if self._ce_acc is None else self._ce_acc + add
            return loss
        if self.train_cfg.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {step + 1} of {self.plan.total_updates} "
                f"(micro-batch {j + 1} of {self.train_cfg.grad_accum_steps}, method "
                f"{self.method}, lambda {lam:.4g}); set train.on_nonfinite=skip to skip such "
                "micro-batches")
        self.state.skipped_micro_batches += 1
        dce, _ = self.strategy.forward(self._on_device(dummy_batch()))
        return dce.sum() * 0.0

    def _report_metrics(self, sums: StepSums, elapsed: float, steps: int, lam: float,
                        grad_norm: float | None) -> dict[str, Any]:
        self.state.tokens += sums.tokens
        self.state.train_seconds += elapsed
        return {
            "step": self.state.step, "total_steps": self.plan.total_updates,
            "epoch": self.state.step * self.train_cfg.grad_accum_steps / self.plan.micro_per_epoch,
            "pos_loss": sums.mean_pos(), "neg_loss": sums.mean_neg(),
            "lambda": lam, "lr": self.strategy.lr(),
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "tokens_per_s": sums.tokens / elapsed if elapsed > 0 else float("nan"),
            "step_time_s": elapsed / steps,
            "skipped_micro_batches": self.state.skipped_micro_batches,
        }

    # ------------------------------------------------------------------ evaluation, state

    def validate(self) -> float | None:
        """Mean CE over the response tokens of the clean held-out rows, over all ranks."""
        rows = self.val_rows
        if rows is None:
            return None
        micro = self.train_cfg.micro_batch_size
        n_batches = self.strategy.max_over_ranks(-(-len(rows) // micro))
        totals = ValidationSums()
        ce_sum: torch.Tensor | None = None  # on the device until the end (no sync per batch)
        self.strategy.set_train(False)
        with torch.no_grad():
            for batch, counts in validation_batches(rows, micro, n_batches, self.pad_id):
                ce, _ = self.strategy.forward(self._on_device(batch))
                if counts:
                    part = ce.double().sum()
                    ce_sum = part if ce_sum is None else ce_sum + part
                    totals.n += ce.numel()
        self.strategy.set_train(True)
        totals.ce = float(ce_sum) if ce_sum is not None else 0.0
        totals = self.strategy.all_reduce(totals)
        return totals.ce / totals.n if totals.n > 0 else None

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Engine shards + trainer state, reported with `metrics` (collective)."""
        with tempfile.TemporaryDirectory(prefix="lethe-ckpt-") as tmp:
            self.strategy.save(Path(tmp))
            save_rng_state(Path(tmp), self.ctx.rank)
            if self.strategy.is_rank_0():
                write_json_atomic(Path(tmp) / STATE_FILE, asdict(self.state))
            self.ctx.report(metrics, Path(tmp), self.state.step)

    def export(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The model as a plain HF folder and metrics.json (rank 0); returns final metrics."""
        state, t = self.state, self.train_cfg
        full = self.strategy.full_state_dict(trainable_only=t.lora is not None)
        out_dir = Path(self.job.job.output_dir)
        final = {**metrics, "steps": state.step, "tokens": state.tokens,
                 "train_seconds": state.train_seconds,
                 "mean_tokens_per_s": (state.tokens / state.train_seconds
                                       if state.train_seconds else None),
                 "skipped_micro_batches": state.skipped_micro_batches,
                 **self.strategy.describe()}
        if self.strategy.is_rank_0():
            dtype = next(iter(full.values())).dtype if full else torch.float32
            save_hf_folder(full, base_path=self.job.job.base_model_path, spec=self.job.spec,
                           train=t, dtype=dtype, out_dir=out_dir / "model")
            final["timing"] = {**final.get("timing", {}), "end": time.time()}
            write_json_atomic(out_dir / "metrics.json", final)
        # Long-timeout gloo barrier: rank 0 may write for minutes; an NCCL wait would time out.
        self.strategy.barrier(long_wait=True)
        return final
