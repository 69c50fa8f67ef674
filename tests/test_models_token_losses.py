"""orchestrator.models' per-token losses: the fused, chunked `token_losses` against full
logits and F.cross_entropy (values and gradients), through LoRA adapters and a trained
head copy, and its input checks. Tokenizers, families and loading: tests/test_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models import FAMILIES, make_corpus, sample_batch, tiny_spec

from orchestrator.models import (
    build_model,
    count_parameters,
    decoder_and_head,
    token_losses,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    """The tokenizer tests/test_models.py's `tokenizer` fixture trains (same corpus, size)."""
    return train_tokenizer(make_corpus(300), vocab_size=400)


def reference_token_losses(model, input_ids, attention_mask, target_mask) -> torch.Tensor:
    """The unfused reference: full logits, F.cross_entropy, shifted by hand."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)
    out = torch.zeros(input_ids.shape)
    out[:, 1:] = ce * target_mask[:, 1:].float()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_token_losses_match_full_logits(family, tokenizer):
    model = build_model(tiny_spec(family), len(tokenizer), seed=1, tokenizer=tokenizer).eval()
    input_ids, attention_mask, target = sample_batch(tokenizer, seed=2)
    losses = token_losses(model, input_ids, attention_mask, target, chunk_size=16)
    expected = reference_token_losses(model, input_ids, attention_mask, target)
    assert losses.dtype == torch.float32 and losses.shape == input_ids.shape
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    assert (losses[:, 0] == 0).all()
    assert (losses[target == 0] == 0).all()
    assert (losses[:, 1:][target[:, 1:] == 1] > 0).all()  # real CE values where targets sit


def test_token_losses_gradient_matches_reference(tokenizer):
    model = build_model(tiny_spec("qwen2"), len(tokenizer), seed=4, tokenizer=tokenizer)
    input_ids, attention_mask, target = sample_batch(tokenizer, seed=5)
    token_losses(model, input_ids, attention_mask, target, chunk_size=8).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_token_losses(model, input_ids, attention_mask, target).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_losses_through_lora(family, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_model(tiny_spec(family), len(tokenizer), seed=6, tokenizer=tokenizer)
    # init_lora_weights=False gives non-zero adapters, so the LoRA path must really be used.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, cfg).eval()
    decoder, weight, bias = decoder_and_head(model)
    assert weight is model.get_base_model().get_output_embeddings().weight and bias is None
    assert count_parameters(model, trainable_only=True) < count_parameters(model)

    input_ids, attention_mask, target = sample_batch(tokenizer, seed=7)
    losses = token_losses(model, input_ids, attention_mask, target, chunk_size=32)
    expected = reference_token_losses(model, input_ids, attention_mask, target)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        without = token_losses(model, input_ids, attention_mask, target, chunk_size=32)
    assert not torch.allclose(losses, without)  # the adapters changed the losses


def test_lora_on_lm_head_is_rejected(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_model(tiny_spec("llama"), len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="leave lm_head out of lora.target_modules"):
        decoder_and_head(model)


def test_token_losses_bad_shapes(tokenizer):
    model = build_model(tiny_spec("llama"), len(tokenizer))
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="target_mask shape"):
        token_losses(model, ids, None, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        token_losses(model, ids[0], None, torch.ones(5))


def test_modules_to_save_head_uses_trained_copy(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_model(tiny_spec("llama"), len(tokenizer), seed=2)
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    _, weight, _ = decoder_and_head(model)
    assert weight.requires_grad  # the trainable copy, not the frozen original
    with torch.no_grad():
        weight.mul_(3.0)  # make the copy differ from the original head
    input_ids, attention_mask, target = sample_batch(tokenizer, seed=3)
    losses = token_losses(model, input_ids, attention_mask, target)
    expected = reference_token_losses(model, input_ids, attention_mask, target)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
