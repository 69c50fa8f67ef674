"""The final export: a plain Hugging Face folder (safetensors + tokenizer) on rank 0.

Whatever the engine, the trained weights are first collected as a full CPU state dict on
rank 0 (ZeRO-3 partitions are all-gathered one parameter at a time, so no rank ever holds
two copies of the model), then loaded into a fresh copy of the base model (with the same
LoRA adapters, merged with `merge_and_unload`). Saving from a fresh copy leaves no
DeepSpeed hooks, partition stubs or peft wrappers in the exported folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.cache import atomic_write_json
from orchestrator.config import ModelSpec, TrainConfig


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_state_dict(module: nn.Module, zero3: bool, *,
                      trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """CPU state dict of `module` on rank 0 (None on other ranks). Collective for ZeRO-3.

    `trainable_only` (LoRA): only the parameters that trained. The frozen base is read from
    the base checkpoint at export anyway, so gathering it would all-gather and copy the
    whole model to rank 0's host memory for nothing (16 GB for an 8B model).
    """
    rank = _rank()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if not zero3:
        if rank != 0:
            return None
        return {n: p.detach().cpu().clone() for n, p in named}
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, param in named:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                out[name] = param.detach().cpu().clone()
    return out if rank == 0 else None


def apply_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                     target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def save_hf_folder(state: dict[str, torch.Tensor], *, base_path: str, spec: ModelSpec,
                   train: TrainConfig, dtype: torch.dtype, out_dir: Path) -> Path:
    """Load `state` (TokenLossModel names, "model." prefix) into a fresh model and save it."""
    from orchestrator.models import load_model, load_tokenizer

    model = load_model(base_path, spec, dtype=dtype, device="cpu")
    if train.lora is not None:
        model = apply_lora(model, train.lora.model_dump())
    prefix = "model."
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(body, strict=False)
    needed = {n for n, _ in model.named_parameters()}  # tied weights are listed once
    if train.lora is not None:  # only the adapters trained; the base came from base_path
        needed = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or (set(missing) & needed):
        raise RuntimeError(f"export: trained weights do not fit the base model: missing "
                           f"{sorted(set(missing) & needed)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if train.lora is not None:
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(spec, base_path).save_pretrained(str(out_dir))
    return out_dir


def _finite_or_none(obj: Any) -> Any:
    """Strict JSON has no NaN: a metric with nothing to average (e.g. neg_loss under sft)
    is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json_atomic(path: Path, body: dict[str, Any]) -> None:
    atomic_write_json(path, _finite_or_none(body), indent=2, default=str, allow_nan=False)
