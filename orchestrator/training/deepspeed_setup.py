"""Engines: DeepSpeed ZeRO (from a JSON file) or plain torch DDP, behind one small interface.

Both take torch AdamW as the optimizer and a warm-up + linear-decay LambdaLR. With ZeRO,
torch AdamW is a "client optimizer" (DeepSpeed's own CPUAdam would cost a ~60 s C++
compile and ~7 GB peak per fresh machine on CPU; on GPU torch's fused AdamW is as fast as
DeepSpeed's FusedAdam). What it costs: no optimizer offload to CPU (offload needs
DeepSpeedCPUAdam), and DeepSpeed asks for `zero_allow_untested_optimizer`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNED_KEYS = ("optimizer", "scheduler")  # the TrainConfig owns these; the file must not


def resolve_config_path(path: str) -> Path:
    """A DeepSpeed JSON path as given, or relative to the repository root."""
    p = Path(path)
    for cand in (p, REPO_ROOT / p):
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(f"train.deepspeed: config file {path!r} not found (also tried "
                            f"{REPO_ROOT / p})")


def fill_deepspeed_config(raw: dict[str, Any], *, micro: int, gas: int, world: int,
                          max_grad_norm: float | None, dtype: torch.dtype) -> dict[str, Any]:
    """The JSON file with every "auto" replaced by the TrainConfig's values.

    The ZeRO stage and its tuning knobs stay as written in the file.
    """
    cfg = copy.deepcopy(raw)
    for key in OWNED_KEYS:
        if key in cfg:
            raise ValueError(f"DeepSpeed config sets {key!r}; remove it: train.lr, "
                             "train.warmup_ratio and train.weight_decay define the optimizer")
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = micro * gas * world
    cfg["gradient_clipping"] = float(max_grad_norm or 0.0)
    cfg.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    cfg.setdefault("fp16", {})["enabled"] = dtype == torch.float16
    cfg["zero_allow_untested_optimizer"] = True  # torch AdamW as the client optimizer
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves

    def _check(node: Any, where: str) -> None:
        if node == "auto":
            raise ValueError(f"DeepSpeed config key {where!r} is 'auto' and Lethe has no value "
                             "for it; set it explicitly in the JSON file")
        if isinstance(node, dict):
            for k, v in node.items():
                _check(v, f"{where}.{k}" if where else k)

    _check(cfg, "")
    return cfg


def load_deepspeed_config(path: str) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON: {exc}") from exc


def zero_stage(ds_cfg: dict[str, Any] | None) -> int:
    return int((ds_cfg or {}).get("zero_optimization", {}).get("stage", 0))


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ceil(ratio * total) steps, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, total_steps: int,
                    warmup_ratio: float, device: torch.device):
    params = [p for p in module.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # fused AdamW kernel on GPU; foreach on CPU
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(total_steps, warmup_ratio))
    return opt, sched


def warn_zero3_for_adapters(module: nn.Module) -> None:
    """ZeRO-3 all-gathers every frozen base weight on every micro-batch. With adapters
    (a few % of parameters trainable) and a base that fits on one GPU, ZeRO-2 keeps the
    base whole on each GPU and is much faster: say so once, at start-up."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if not total or trainable / total > 0.1 or not torch.cuda.is_available():
        return
    base_bytes = sum(p.numel() * p.element_size() for p in params)
    gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if base_bytes < 0.5 * gpu_bytes:
        logging.getLogger(__name__).warning(
            "ZeRO-3 with %.1f %% trainable parameters and a %.1f GiB model on a %.0f GiB GPU: "
            "every micro-batch all-gathers the frozen base; configs/deepspeed/zero2.json keeps "
            "it whole on each GPU and is faster here", 100 * trainable / total,
            base_bytes / 2**30, gpu_bytes / 2**30)


# A build of a DeepSpeed C++ op takes about a minute (several on a loaded 2-core machine).
STALE_BUILD_LOCK_S = 20 * 60


def clear_stale_build_locks(root: str | None = None, max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove torch-extension build locks left by a killed build.

    torch's FileBaton waits for `<TORCH_EXTENSIONS_DIR>/<op>/lock` to disappear, with no
    timeout: when the process that compiled DeepSpeed's comm op was killed mid-build (a
    stopped Ray, a cancelled job), every later DeepSpeed start waits forever. A lock older
    than any real build is removed (ninja then finishes the build incrementally).
    """
    import time

    root = root or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root or not os.path.isdir(root):
        return []
    removed = []
    for lock in Path(root).glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:  # another worker removed it first
            continue
    for path in removed:
        logging.getLogger(__name__).warning("removed a stale torch-extension build lock %s (a killed build left it)", path)
    return removed


class DeepSpeedEngine:
    """A DeepSpeed engine; `step()` is called after every micro-batch (DeepSpeed's rule)."""

    kind = "deepspeed"

    def __init__(self, loss_model: nn.Module, ds_cfg: dict[str, Any], opt, sched) -> None:
        import deepspeed

        self.stage = zero_stage(ds_cfg)
        if self.stage == 3:
            # The head weight is read inside TokenLossModel.forward, not via lm_head.forward.
            from deepspeed.runtime.zero import register_external_parameter

            register_external_parameter(loss_model, loss_model.head_weight())
        if self.stage == 3:
            warn_zero3_for_adapters(loss_model)
        clear_stale_build_locks()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=loss_model, optimizer=opt, lr_scheduler=sched, config=ds_cfg,
            dist_init_required=False,
        )
        self.module = self.engine.module
        # LoRA: the frozen base is the base checkpoint; checkpoints keep the adapters only
        # (every rank otherwise writes the whole base to shared storage at each checkpoint).
        self.frozen = any(not p.requires_grad for p in loss_model.parameters())

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.engine(**batch)  # TokenLossModel.forward's names (loss.target_rows)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)  # divides by gas: Normalizer.scale accounts for it

    def micro_step(self, boundary: bool) -> float | None:
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path) -> None:
        # Every rank writes its own ZeRO shard (collective).
        self.engine.save_checkpoint(str(directory), tag="state",
                                    exclude_frozen_parameters=self.frozen)

    def load(self, directory: Path) -> None:
        # Frozen parameters are absent from the checkpoint (they are the base's own).
        path, _ = self.engine.load_checkpoint(str(directory), tag="state",
                                              load_module_strict=not self.frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")


class DDPEngine:
    """Plain torch: DDP when world > 1, the bare module otherwise; autocast for bf16/fp16."""

    kind = "ddp"

    def __init__(self, loss_model: nn.Module, opt, sched, *, gas: int, max_grad_norm: float | None,
                 device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        self.module = loss_model
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ids = [device.index] if device.type == "cuda" else None
        self.wrapped = nn.parallel.DistributedDataParallel(loss_model, device_ids=ids) \
            if distributed else loss_model
        self.optimizer, self.scheduler = opt, sched
        self.gas, self.max_grad_norm = gas, max_grad_norm
        self.device, self.autocast_dtype = device, autocast_dtype
        self._micro = 0

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            # What `no_sync()` toggles: all-reduce gradients once per optimizer step only.
            self.wrapped.require_backward_grad_sync = (self._micro + 1) % self.gas == 0
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with amp:
            return self.wrapped(**batch)

    def backward(self, loss: Tensor) -> None:
        # Divide by gas like DeepSpeed does, so Normalizer.scale is the same for both engines.
        (loss / self.gas).backward()

    def micro_step(self, boundary: bool) -> float | None:
        self._micro += 1
        if not boundary:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if not dist.is_initialized() or dist.get_rank() == 0:
            frozen = {n for n, p in self.module.named_parameters(remove_duplicate=False)
                      if not p.requires_grad}
            # Frozen parameters (a LoRA base) are the base checkpoint's: not saved again.
            state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()
                     if k not in frozen}
            # Tied weights appear under two names with one storage; safetensors refuses that.
            seen: dict[int, str] = {}
            unique = {}
            for k, v in state.items():
                ptr = v.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen[ptr] = k
                    unique[k] = v
            save_file(unique, str(directory / "ddp_model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / "ddp_optim.pt")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / "ddp_model.safetensors"), device=str(self.device))
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        # deduplicated names; frozen parameters are not in the checkpoint (see save)
        tied = {n for n, p in self.module.named_parameters() if p.requires_grad}
        if unexpected or (set(missing) & tied):
            raise RuntimeError(f"checkpoint does not match the model: missing "
                               f"{sorted(set(missing) & tied)}, unexpected {sorted(unexpected)}")
        blob = torch.load(directory / "ddp_optim.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
