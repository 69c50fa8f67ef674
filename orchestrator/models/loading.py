"""Loading checkpoints (hub id or local folder) and materializing the tiny offline base models."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from orchestrator.config import ModelSpec
from orchestrator.hub import COMMIT, hub_commit, hub_offline
from orchestrator.models.families import (
    FAMILY_MODEL_TYPES,
    build_model,
    resolve_attn_implementation,
    resolve_tiny_sizes,
)
from orchestrator.models.tokenizer import load_tokenizer, train_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """Config dtype name -> torch dtype. "auto": bfloat16 on a GPU that supports it, else
    float32 (CPU bf16 matmuls are slow and fp16 on CPU is poorly supported)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_model(
    path_or_id: str,
    spec: ModelSpec | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a local folder or hub id, checked against `spec.family` when given.

    Local folders need no network; with HF_HUB_OFFLINE=1 a hub id resolves from the local
    cache only. The config is read first so that a wrong checkpoint fails with a clear
    message before any weights are read. `attn_implementation` overrides the spec's
    (callers without a spec, e.g. the scorer, pass the configured one).
    """
    trust = trust_remote_code or (spec is not None and spec.trust_remote_code)
    # The spec's revision pins its pretrained checkpoint, not other paths (e.g. a fine-tune);
    # an explicit `revision` (the commit a hub id resolved to on first use) pins a hub id.
    if revision is None or Path(path_or_id).exists():
        revision = spec.revision if spec is not None and path_or_id == spec.pretrained else None
    extra = {"revision": revision} if revision else {}
    if Path(path_or_id).exists() and not (Path(path_or_id) / "config.json").is_file():
        raise FileNotFoundError(f"{path_or_id}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust, **extra)
    if spec is not None and config.model_type != FAMILY_MODEL_TYPES[spec.family]:
        raise ValueError(
            f"model '{spec.name}': checkpoint {path_or_id} has model_type "
            f"'{config.model_type}', but the spec's family is '{spec.family}' "
            f"(expects model_type '{FAMILY_MODEL_TYPES[spec.family]}')"
        )
    requested = attn_implementation or (spec.attn_implementation if spec is not None else "sdpa")
    check_device(device)
    # Weights go straight to a GPU (device_map), not through host RAM first: 8 scoring
    # actors on one node would otherwise each stage a full copy in host memory.
    if torch.device(device).type == "cuda":
        extra["device_map"] = {"": torch.device(device)}
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id,
        config=config,
        dtype=resolve_dtype(dtype, device),
        attn_implementation=resolve_attn_implementation(config.model_type, requested),
        trust_remote_code=trust,
        **extra,
    )
    return model.to(device)


def resolve_revision(repo_id: str, revision: str | None = None, *,
                     cache_dir: str | Path | None = None) -> str | None:
    """The commit a hub model id resolves to now (`revision`: a branch, tag or commit; None =
    the default branch), so a run can record exactly which weights it used.

    A 40-hex commit is returned as it is. Otherwise the local Hugging Face cache is asked
    first (the snapshot folder of `config.json` is named by its commit: works offline); then,
    unless HF_HUB_OFFLINE is set, the hub. None when neither knows the id (a local folder is
    not a hub id: its content is fingerprinted instead).
    """
    if COMMIT.match(revision or ""):
        return revision
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir,
                                        revision=revision)
    except ValueError:  # not a valid repo id
        return None
    if isinstance(cached, str):
        commit = Path(cached).parent.name
        if COMMIT.match(commit):
            return commit
    if hub_offline():
        return None
    return hub_commit(repo_id, revision, "model")


def check_device(device: str | torch.device) -> None:
    """A CUDA device must exist when asked for: never fall back to CPU silently."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {str(device)!r} was asked for, but no CUDA device is visible to this "
            f"process (torch {torch.__version__}, CUDA build {torch.version.cuda}): install the "
            "CUDA wheel matching the driver, or configure CPU (use_gpu / num_gpus 0)")


def materialize_base(spec: ModelSpec, texts: Iterable[str], out_dir: Path, seed: int = 0) -> str:
    """The base model's location: spec.pretrained, a GGUF file de-quantized into `out_dir`
    (see orchestrator/models/gguf.py), or a tiny model built and saved here.

    For from_config specs, trains the tokenizer on `texts` (spec.tokenizer == "train") or
    loads spec.tokenizer, builds the model with the tokenizer's vocabulary and special ids,
    and saves both to `out_dir` as a plain HF folder (config, safetensors, tokenizer) that
    `load_model` / `load_tokenizer` / lm-eval read like any checkpoint. Deterministic in
    (spec, texts, seed).
    """
    if spec.gguf is not None:
        from orchestrator.models.gguf import materialize_gguf  # needs the `gguf` package

        return materialize_gguf(spec, Path(out_dir))
    if spec.from_config is None:
        return str(spec.pretrained)
    sizes = resolve_tiny_sizes(spec)  # fail on a bad key before spending time on the tokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == "train":
        tokenizer = train_tokenizer(texts, spec.tokenizer_vocab_size, family=spec.family)
    else:
        tokenizer = load_tokenizer(spec)
    # Longer inputs than the position table would index out of range (GPT-Neo) or
    # extrapolate RoPE; let the tokenizer warn about them.
    tokenizer.model_max_length = sizes["max_position_embeddings"]
    model = build_model(spec, len(tokenizer), seed, tokenizer=tokenizer)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)
