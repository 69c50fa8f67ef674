"""Where a causal LM's decoder and head are, for the method core's loss path.

The model's own forward would materialise [B, T, V] logits (V can be 150k); the method core
(`method.token_loss.decoder_token_ce`) runs the decoder alone and computes the CE of the
target rows a chunk at a time. This module only finds the pieces for llama / qwen2 / gpt_neo
(through a peft wrapper); `token_losses` is the [B, T] form for tests and analyses.
"""

from __future__ import annotations

from torch import Tensor, nn

from orchestrator.method.token_loss import aligned_token_ce


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft PeftModel (the model itself otherwise).

    LoRA layers stay in place inside the returned model, so running its decoder still
    applies the adapters.
    """
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, Tensor, Tensor | None]:
    """(decoder, lm_head weight [V, H], lm_head bias [V] or None) of a causal LM.

    The decoder is the `base_model_prefix` submodule (`model` for llama / qwen2,
    `transformer` for gpt_neo); its output's `last_hidden_state` is taken after the final
    norm, so `hidden @ weight.T + bias` are exactly the model's logits (these families apply
    no logit scaling or soft-capping). Works through a peft wrapper.
    """
    base = _unwrap_peft(model)
    prefix = getattr(base, "base_model_prefix", None)
    decoder = getattr(base, prefix, None) if prefix else None
    if decoder is None or decoder is base:
        raise ValueError(
            f"{type(base).__name__}: cannot find the decoder submodule "
            f"(base_model_prefix={prefix!r}); expected a *ForCausalLM model"
        )
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head)")
    if getattr(head, "base_layer", None) is not None:
        # A peft tuner layer (e.g. LoRA) on the head: its .weight is the frozen base weight
        # without the adapter's delta, so losses from it would silently be wrong.
        raise ValueError(
            "an adapter wraps lm_head; the chunked per-token loss reads the head weight "
            "directly, so leave lm_head out of lora.target_modules (modules_to_save is fine)"
        )
    # Returned as the live parameter even when DeepSpeed ZeRO-3 has partitioned it (empty
    # outside a forward): a caller that reads it inside a module's forward registers it as
    # an external parameter there (training.loss.TokenLossModel does).
    return decoder, head.weight, getattr(head, "bias", None)


def token_losses(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    target_mask: Tensor,
    *,
    chunk_size: int = 4096,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Per-token CE of a causal LM, float32 [B, T] aligned with input_ids (0.0 off targets and
    at position 0): `method.aligned_token_ce` on this model's decoder and head."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if target_mask.shape != input_ids.shape:
        raise ValueError(
            f"target_mask shape {tuple(target_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    decoder, weight, bias = decoder_and_head(model)
    return aligned_token_ce(decoder, weight, bias, input_ids, target_mask,
                            attention_mask=attention_mask, position_ids=position_ids,
                            chunk_size=chunk_size)
