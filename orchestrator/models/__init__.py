"""Model families (llama, qwen2, gpt_neo): tokenizers, tiny models from config, loading, and
per-token losses from hidden states. See docs/ARCHITECTURE.md for the binding signatures."""

from orchestrator.models.families import (
    FAMILY_MODEL_TYPES,
    FAMILY_TINY_DEFAULTS,
    build_model,
    count_parameters,
    flops_per_token,
    matmul_parameters,
    resolve_attn_implementation,
    resolve_tiny_sizes,
)
from orchestrator.models.loading import load_model, materialize_base, resolve_dtype
from orchestrator.models.losses import decoder_and_head, token_losses
from orchestrator.models.tokenizer import (
    CHAT_TAGS,
    EOS_TOKEN,
    PAD_TOKEN,
    fix_pad_token,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "CHAT_TAGS",
    "EOS_TOKEN",
    "FAMILY_MODEL_TYPES",
    "FAMILY_TINY_DEFAULTS",
    "PAD_TOKEN",
    "build_model",
    "count_parameters",
    "decoder_and_head",
    "fix_pad_token",
    "flops_per_token",
    "load_model",
    "load_tokenizer",
    "materialize_base",
    "matmul_parameters",
    "resolve_attn_implementation",
    "resolve_dtype",
    "resolve_tiny_sizes",
    "token_losses",
    "train_tokenizer",
]
