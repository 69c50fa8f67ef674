"""orchestrator.models: tokenizers, tiny families, loading (tiny and offline). The per-token
losses are in tests/test_models_token_losses.py, which uses the helpers and fixtures here."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import ModelSpec
from orchestrator.models import (
    CHAT_TAGS,
    EOS_TOKEN,
    FAMILY_TINY_DEFAULTS,
    PAD_TOKEN,
    build_model,
    count_parameters,
    flops_per_token,
    load_model,
    load_tokenizer,
    materialize_base,
    matmul_parameters,
    resolve_tiny_sizes,
    train_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ["llama", "qwen2", "gpt_neo"]
SUBJECTS = ["the cat", "a farmer", "my sister", "the robot", "our teacher", "Paris", "Bob"]
VERBS = ["sees", "counts", "paints", "sells", "likes", "finds", "adds"]
OBJECTS = ["12 apples", "three pears", "a red car", "the blue sky", "7 books", "green tea"]


def make_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        question = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}?"
        answer = f"Yes, {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.randint(0, 999)}."
        texts.append(f"<|user|>\n{question}\n<|assistant|>\n{answer}{EOS_TOKEN}\n")
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(300)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def family_tokenizers(corpus, tokenizer):
    """The tokenizer each family's materialized base gets (qwen2 has its own pre-tokenizer)."""
    qwen2 = train_tokenizer(corpus, vocab_size=400, family="qwen2")
    return {"llama": tokenizer, "gpt_neo": tokenizer, "qwen2": qwen2}


def tiny_spec(family: str, **sizes: int) -> ModelSpec:
    return ModelSpec(name=f"tiny-{family}", family=family, from_config=sizes or {})


def sample_batch(tokenizer, seed: int = 0):
    """Two chat rows of different lengths (right padding) and a random target mask."""
    rows = make_corpus(2, seed=seed + 100)
    rows[1] = rows[1] + " and more words to make this row longer than the first one"
    enc = tokenizer(rows, return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(seed)
    target = (torch.rand(enc.input_ids.shape, generator=gen) < 0.6).long() * enc.attention_mask
    target[:, 0] = 1  # position 0 must come out 0 even when flagged
    return enc.input_ids, enc.attention_mask, target


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_trained_tokenizer_specials_and_offsets(family, family_tokenizers):
    tokenizer = family_tokenizers[family]
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    assert tokenizer.padding_side == "right"
    assert 300 < len(tokenizer) <= 400
    tag_ids = tokenizer.convert_tokens_to_ids(list(CHAT_TAGS))
    assert tag_ids == [2, 3, 4]
    # Tags glued to content still come out as exactly one token each.
    text = "<|system|>be brief<|user|>hi<|assistant|>ok" + EOS_TOKEN
    enc = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens[0] == "<|system|>" and "<|user|>" in tokens and "<|assistant|>" in tokens
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    # Offsets tile the text with no gaps (trim_offsets=False) and point at the right chars.
    spans = enc.offset_mapping
    assert spans[0] == (0, len("<|system|>"))
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] == len(text)
    assert "".join(text[s:e] for s, e in spans) == text
    assert tokenizer.decode(enc.input_ids) == text


def test_trained_tokenizer_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert rendered == f"<|user|>\nhi\n<|assistant|>\nok{EOS_TOKEN}\n"


def test_train_tokenizer_rejects_tiny_vocab(corpus):
    with pytest.raises(ValueError, match="vocab_size must be >= 261"):
        train_tokenizer(corpus, vocab_size=100)


def test_train_tokenizer_saves(corpus, tmp_path):
    tok = train_tokenizer(corpus[:50], vocab_size=300, out_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    again = load_tokenizer(tiny_spec("llama"), str(tmp_path / "tok"))
    assert again("Bob sells 7 books").input_ids == tok("Bob sells 7 books").input_ids
    assert again.pad_token == PAD_TOKEN  # an existing pad token is kept


@pytest.fixture(scope="module")
def tokenizer_without_pad_dir(tmp_path_factory, corpus):
    """A saved tokenizer with no pad token and some Llama-3 / Qwen2 style special tokens."""
    tok = train_tokenizer(corpus[:50], vocab_size=300)
    tok.add_tokens(["<|reserved_special_token_0|>"], special_tokens=True)
    tok.pad_token = None
    out = tmp_path_factory.mktemp("nopad")
    tok.save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize(
    ("family", "pad_token", "expected"),
    [
        ("llama", None, "<|reserved_special_token_0|>"),
        ("qwen2", None, "<|endoftext|>"),
        ("gpt_neo", None, EOS_TOKEN),
        ("gpt_neo", "<|system|>", "<|system|>"),
    ],
)
def test_load_tokenizer_fixes_pad(tokenizer_without_pad_dir, family, pad_token, expected):
    spec = ModelSpec(
        name="m", family=family, pretrained=tokenizer_without_pad_dir, pad_token=pad_token
    )
    tok = load_tokenizer(spec)
    assert tok.pad_token == expected
    assert tok.pad_token_id == tok.convert_tokens_to_ids(expected)
    assert tok.padding_side == "right"


def test_load_tokenizer_llama_falls_back_to_eos(corpus, tmp_path):
    tok = train_tokenizer(corpus[:50], vocab_size=300)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(ModelSpec(name="m", family="llama", pretrained=str(tmp_path)))
    assert loaded.pad_token == EOS_TOKEN and loaded.pad_token_id == 0


def test_load_tokenizer_errors(tokenizer_without_pad_dir):
    spec = ModelSpec(
        name="m", family="llama", pretrained=tokenizer_without_pad_dir, pad_token="<nope>"
    )
    with pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer"):
        load_tokenizer(spec)
    with pytest.raises(ValueError, match="needs the path"):
        load_tokenizer(tiny_spec("qwen2"))  # tokenizer "train" and no path


# ----------------------------------------------------------------------------- families


def test_tiny_defaults_and_derived_sizes():
    assert FAMILY_TINY_DEFAULTS["llama"] == {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
    }
    assert FAMILY_TINY_DEFAULTS["gpt_neo"]["intermediate_size"] == 256
    assert "num_kv_heads" not in FAMILY_TINY_DEFAULTS["gpt_neo"]
    assert resolve_tiny_sizes(tiny_spec("llama", hidden_size=128))["intermediate_size"] == 256
    assert resolve_tiny_sizes(tiny_spec("gpt_neo", hidden_size=128))["intermediate_size"] == 512
    assert resolve_tiny_sizes(tiny_spec("qwen2", num_heads=8))["num_kv_heads"] == 4


@pytest.mark.parametrize(
    ("family", "sizes", "message"),
    [
        ("llama", {"hidden": 64}, "unknown from_config key 'hidden'.*allowed keys: hidden_size"),
        (
            "gpt_neo",
            {"num_kv_heads": 2},
            "unknown from_config key 'num_kv_heads' for family 'gpt_neo'",
        ),
        (
            "qwen2",
            {"hidden_size": 66},
            r"hidden_size \(66\) must be divisible by .*num_heads \(4\)",
        ),
        ("llama", {"num_heads": 4, "num_kv_heads": 3}, r"num_heads \(4\) must be divisible"),
        ("llama", {"num_layers": 0}, "num_layers must be >= 1"),
    ],
)
def test_bad_from_config(family, sizes, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_spec(family, **sizes), vocab_size=300)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_forward_save_load_roundtrip(family, family_tokenizers, tmp_path):
    tokenizer = family_tokenizers[family]
    spec = tiny_spec(family)
    model = build_model(spec, len(tokenizer), seed=3, tokenizer=tokenizer)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (
        1,
        0,
        0,
    )
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 64)
    if family == "gpt_neo":
        assert model.config.attention_layers == ["global", "local"]
        assert model.config.window_size == 256
        assert model.config._attn_implementation == "eager"  # no SDPA path for GPT-Neo
    else:
        assert model.config.num_key_value_heads == 2
        assert model.config._attn_implementation == "sdpa"

    input_ids, attention_mask, _ = sample_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (*input_ids.shape, len(tokenizer))
    assert torch.isfinite(logits).all()

    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(str(tmp_path), spec)
    with torch.no_grad():
        logits_again = loaded(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=0)
    tok_again = load_tokenizer(spec, str(tmp_path))
    # AutoTokenizer picks the class from config.json (Qwen2Tokenizer for qwen2): the ids
    # must still be exactly those of the tokenizer as trained.
    for text in [*make_corpus(5, seed=9), "Ünïcode  spaces\n\n 1234 <|system|>x"]:
        assert tok_again(text).input_ids == tokenizer(text).input_ids, text
    assert tok_again.pad_token_id == 1 and tok_again.eos_token_id == 0


def test_gpt_neo_odd_layers_alternate():
    model = build_model(tiny_spec("gpt_neo", num_layers=3, window_size=8), vocab_size=300)
    assert model.config.attention_layers == ["global", "local", "global"]
    assert model.config.window_size == 8


def test_same_seed_same_weights_and_rng_untouched():
    spec = tiny_spec("llama")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(spec, 300, seed=7).state_dict()
    after = torch.rand(3)
    b = build_model(spec, 300, seed=7).state_dict()
    c = build_model(spec, 300, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(before, after)  # build_model does not consume the caller's RNG


def test_concurrent_builds_match_sequential_ones():
    """The pipeline builds several families from threads at once: the seeded init must not
    depend on how the threads interleave (the RNG being forked is process-wide)."""
    from concurrent.futures import ThreadPoolExecutor

    specs = [tiny_spec(f, hidden_size=64) for f in ("llama", "qwen2", "gpt_neo")] * 2
    alone = [build_model(s, 500, seed=i).state_dict() for i, s in enumerate(specs)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda a: build_model(a[1], 500, seed=a[0]).state_dict(),
                                 enumerate(specs)))
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("vocab_size", [280, 700])
def test_other_vocab_sizes(vocab_size):
    tok = train_tokenizer(make_corpus(400, seed=vocab_size), vocab_size=vocab_size)
    assert 261 < len(tok) <= vocab_size
    model = build_model(tiny_spec("qwen2"), len(tok), tokenizer=tok)
    ids = torch.tensor([tok("Bob likes green tea").input_ids])
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_count_parameters_and_flops(tokenizer):
    vocab = len(tokenizer)
    llama = build_model(tiny_spec("llama"), vocab)
    # Untied: embeddings + head + per layer (q, o: 64x64; k, v: 64x32; MLP 3x64x128; 2 norms) + norm.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert count_parameters(llama) == 2 * vocab * 64 + 2 * per_layer + 64
    n_matmul = 2 * (per_layer - 2 * 64) + vocab * 64
    assert matmul_parameters(llama.config) == n_matmul
    assert flops_per_token(llama.config, 100) == 6 * n_matmul + 12 * 64 * 100 * 2
    assert flops_per_token(llama.config, 100, training=False) == (6 * n_matmul + 12 * 64 * 200) / 3

    neo = build_model(tiny_spec("gpt_neo", window_size=16), vocab)
    n_neo = 2 * (4 * 64 * 64 + 2 * 64 * 256) + vocab * 64  # tied head still costs a matmul
    assert matmul_parameters(neo.config) == n_neo
    # Layer 0 is global (span 100), layer 1 local (span = window 16).
    assert flops_per_token(neo.config, 100) == 6 * n_neo + 12 * 64 * (100 + 16)
    # Tied weights are counted once.
    assert neo.lm_head.weight is neo.transformer.wte.weight
    assert count_parameters(neo) == sum(p.numel() for p in set(neo.parameters()))


# ----------------------------------------------------------------------------- loading


def test_load_model_family_mismatch_and_dtype(tokenizer, tmp_path):
    build_model(tiny_spec("llama"), len(tokenizer)).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="model_type 'llama', but the spec's family is 'qwen2'"):
        load_model(str(tmp_path), tiny_spec("qwen2"))
    model = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / ".."), tiny_spec("llama"))


def test_materialize_base_deterministic(corpus, tmp_path):
    spec = ModelSpec(
        name="tiny", family="gpt_neo", from_config={"num_layers": 2}, tokenizer_vocab_size=400
    )
    first = materialize_base(spec, corpus, tmp_path / "a", seed=5)
    second = materialize_base(spec, iter(corpus), tmp_path / "b", seed=5)
    assert first == str(tmp_path / "a")
    wa = load_file(os.path.join(first, "model.safetensors"))
    wb = load_file(os.path.join(second, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()
    tok = load_tokenizer(spec, first)
    model = load_model(first, spec)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    assert tok.model_max_length == 512

    pretrained = ModelSpec(name="hub", family="llama", pretrained="some/hub-model")
    assert materialize_base(pretrained, corpus, tmp_path / "c") == "some/hub-model"
    assert not (tmp_path / "c").exists()


def test_materialize_base_with_given_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    spec = ModelSpec(name="t", family="llama", from_config={}, tokenizer=str(tmp_path / "tok"))
    out = materialize_base(spec, [], tmp_path / "base")
    assert load_model(out, spec).config.vocab_size == len(tokenizer)


def test_tokenizer_source_and_revision():
    from orchestrator.models.tokenizer import _tokenizer_source

    hub = ModelSpec(name="m", family="qwen2", pretrained="org/model", revision="abc123")
    assert _tokenizer_source(hub, None) == ("org/model", "abc123")
    assert _tokenizer_source(hub, "org/model") == ("org/model", "abc123")
    assert _tokenizer_source(hub, "/runs/finetuned") == ("/runs/finetuned", None)
    own = ModelSpec(name="m", family="qwen2", pretrained="org/model", tokenizer="org/tok")
    assert _tokenizer_source(own, None) == ("org/tok", None)
