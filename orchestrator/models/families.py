"""Model families (llama, qwen2, gpt_neo): tiny configs built from sizes, seeded init, FLOPs.

The tiny models are the embedded default's offline stand-ins for real hub checkpoints: same
architecture classes, same code paths (attention masks, rotary / learned positions, tied or
untied heads), only smaller. Everything here takes the vocabulary size from the tokenizer;
no number is assumed.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPTNeoConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from orchestrator.config import ModelSpec

# Sizes the embedded demo uses per family. GPT-Neo has no grouped-query attention (so no
# num_kv_heads) and its MLP is conventionally 4 x hidden; it has a local-attention window.
_GQA_TINY = {  # llama and qwen2 share the decoder layout at this size
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}
FAMILY_TINY_DEFAULTS: dict[str, dict[str, int]] = {
    "llama": dict(_GQA_TINY),
    "qwen2": dict(_GQA_TINY),
    "gpt_neo": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 256,
        "max_position_embeddings": 512,
        "window_size": 256,
    },
}

# HF `model_type` of each family's config; the family names were chosen to equal them.
FAMILY_MODEL_TYPES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "gpt_neo": "gpt_neo"}

# Ids of the special tokens in a tokenizer made by `train_tokenizer` (its special tokens are
# trained first, so they get the lowest ids). Used when build_model gets no tokenizer.
TRAINED_TOKENIZER_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def resolve_attn_implementation(family: str, requested: str) -> str:
    """The attention kernel to ask transformers for.

    GPT-Neo has no SDPA path in transformers (it raises); since "sdpa" is the schema default,
    a GPT-Neo spec that did not ask for anything special gets "eager" instead of an error.
    flash_attention_2 is passed through: GPT-Neo supports it.
    """
    if family == "gpt_neo" and requested == "sdpa":
        return "eager"
    return requested


def resolve_tiny_sizes(spec: ModelSpec) -> dict[str, int]:
    """`spec.from_config` merged over the family defaults, validated.

    Missing sizes that scale with the width are derived from the given hidden size (FFN =
    2x hidden for llama/qwen2 as in the demo sizes, 4x for gpt_neo; kv heads = half the heads
    when that divides) rather than copied from the defaults, so `{hidden_size: 256}` alone
    still gives a sensible model.
    """
    if spec.from_config is None:
        raise ValueError(
            f"model '{spec.name}': from_config is not set (pretrained={spec.pretrained!r})"
        )
    defaults = FAMILY_TINY_DEFAULTS[spec.family]
    given = dict(spec.from_config)
    for key in given:
        if key not in defaults:
            raise ValueError(
                f"model '{spec.name}': unknown from_config key '{key}' for family "
                f"'{spec.family}'; allowed keys: {', '.join(sorted(defaults))}"
            )
    sizes = {**defaults, **given}
    if "hidden_size" in given and "intermediate_size" not in given:
        sizes["intermediate_size"] = sizes["hidden_size"] * (4 if spec.family == "gpt_neo" else 2)
    if "num_kv_heads" in defaults and "num_heads" in given and "num_kv_heads" not in given:
        heads = sizes["num_heads"]
        sizes["num_kv_heads"] = heads // 2 if heads % 2 == 0 else heads
    if spec.family == "gpt_neo" and "window_size" not in given:
        sizes["window_size"] = min(sizes["window_size"], sizes["max_position_embeddings"])

    for key, value in sizes.items():
        if value < 1:
            raise ValueError(f"model '{spec.name}': from_config.{key} must be >= 1, got {value}")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise ValueError(
            f"model '{spec.name}': from_config.hidden_size ({sizes['hidden_size']}) must be "
            f"divisible by from_config.num_heads ({sizes['num_heads']})"
        )
    if "num_kv_heads" in sizes and sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ValueError(
            f"model '{spec.name}': from_config.num_heads ({sizes['num_heads']}) must be "
            f"divisible by from_config.num_kv_heads ({sizes['num_kv_heads']})"
        )
    return sizes


def _gpt_neo_attention_types(num_layers: int) -> list[list[Any]]:
    """Alternating global/local layers (global first), as in the released GPT-Neo models.

    GPT-Neo's format is [[pattern, repeats], ...]; an odd layer count gets one extra global.
    """
    types: list[list[Any]] = []
    if num_layers // 2:
        types.append([["global", "local"], num_layers // 2])
    if num_layers % 2:
        types.append([["global"], 1])
    return types


def tiny_config(
    spec: ModelSpec, vocab_size: int, special_ids: dict[str, int | None]
) -> PreTrainedConfig:
    """The HF config of the tiny model that `spec.from_config` describes."""
    if vocab_size < 1:
        raise ValueError(f"model '{spec.name}': vocab_size must be >= 1, got {vocab_size}")
    for name, value in special_ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(
                f"model '{spec.name}': {name}={value} is outside the vocabulary (size {vocab_size})"
            )
    sizes = resolve_tiny_sizes(spec)
    common = {"vocab_size": vocab_size, **special_ids}
    if spec.family == "gpt_neo":
        return GPTNeoConfig(
            hidden_size=sizes["hidden_size"],
            num_layers=sizes["num_layers"],
            num_heads=sizes["num_heads"],
            intermediate_size=sizes["intermediate_size"],
            max_position_embeddings=sizes["max_position_embeddings"],
            attention_types=_gpt_neo_attention_types(sizes["num_layers"]),
            window_size=sizes["window_size"],
            **common,
        )
    config_class = LlamaConfig if spec.family == "llama" else Qwen2Config
    return config_class(
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        num_key_value_heads=sizes["num_kv_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=sizes["max_position_embeddings"],
        **common,
    )


def special_token_ids(tokenizer: PreTrainedTokenizerBase | None) -> dict[str, int | None]:
    """bos/eos/pad ids for the model config (generation stops and pads with these)."""
    if tokenizer is None:
        return dict(TRAINED_TOKENIZER_IDS)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


_INIT_LOCK = threading.Lock()


def build_model(
    spec: ModelSpec,
    vocab_size: int,
    seed: int = 0,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """A freshly initialised tiny model of `spec.family` with `spec.from_config` sizes.

    Same seed -> bit-identical weights: the init runs under a forked RNG seeded with `seed`,
    which also leaves the caller's global RNG state untouched. The config carries the
    tokenizer's bos/eos/pad ids; without a tokenizer, those of `train_tokenizer`'s layout.
    """
    config = tiny_config(spec, vocab_size, special_token_ids(tokenizer))
    # The RNG fork is of the process-wide generator: the pipeline builds several families
    # from threads at once, and interleaved draws would make the weights depend on timing.
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config,
            attn_implementation=resolve_attn_implementation(spec.family, spec.attn_implementation),
            dtype=torch.float32,
        )
    # generation_config is derived from the config at init; keep its ids in step.
    for name, value in config.to_dict().items():
        if name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, name, value)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _config_value(config: PreTrainedConfig, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def matmul_parameters(config: PreTrainedConfig) -> int:
    """Parameters that take part in a matmul per token: attention + MLP weights and the head.

    Embedding lookups, position embeddings, norms and biases are excluded (no FLOPs worth
    counting), the lm_head is included (it is a V x H matmul per token even when tied).
    """
    hidden = config.hidden_size
    layers = _config_value(config, "num_hidden_layers", "num_layers")
    heads = _config_value(config, "num_attention_heads", "num_heads")
    head_dim = _config_value(config, "head_dim", default=hidden // heads)
    kv_heads = _config_value(config, "num_key_value_heads", default=heads)
    if config.model_type == "gpt_neo":
        ffn = _config_value(config, "intermediate_size", default=4 * hidden)
        per_layer = 4 * hidden * hidden + 2 * hidden * ffn  # q, k, v, out; fc_in, fc_out
    else:
        ffn = config.intermediate_size
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        per_layer = attention + 3 * hidden * ffn  # gate, up, down (SwiGLU)
    return layers * per_layer + config.vocab_size * hidden


def flops_per_token(config: PreTrainedConfig, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token, for MFU: 6N + 12 * sum_layers(attn_width * span) (PaLM, App. B).

    N = `matmul_parameters`. The attention term counts QK^T and AV over the attended span:
    the sequence length, or the window for GPT-Neo's local layers; it is not halved for the
    causal mask (the common convention, so MFU numbers compare across reports). With
    training=False it is the forward pass only (a third: 2N + 4 * ...), for scoring.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    hidden = config.hidden_size
    heads = _config_value(config, "num_attention_heads", "num_heads")
    attn_width = heads * _config_value(config, "head_dim", default=hidden // heads)
    if config.model_type == "gpt_neo":
        window = config.window_size
        spans = [
            seq_len if kind == "global" else min(seq_len, window)
            for kind in config.attention_layers
        ]
    else:
        spans = [seq_len] * _config_value(config, "num_hidden_layers", "num_layers")
    training_flops = 6 * matmul_parameters(config) + 12 * attn_width * sum(spans)
    return float(training_flops if training else training_flops / 3)
