"""Warm-up pretraining of tiny bases: held-out questions stay out, it learns, it is seeded,
and the config rejects what cannot work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import (
    ConfigError,
    ModelSpec,
    SyntheticConfig,
    WarmupConfig,
    config_from_dict,
)
from orchestrator.data import corpus_texts, generate_synthetic
from orchestrator.models import materialize_base
from orchestrator.models.warmup import (
    WARMUP_REPORT,
    reserved_questions,
    warm_up_base,
    warmup_conversations,
    warmup_texts,
)

SYNTH = SyntheticConfig(num_train=80, num_eval=30, noise_fraction=0.3, seed=3)
SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
         "intermediate_size": 64, "max_position_embeddings": 128}


def _spec(steps: int = 30, seed: int = 1) -> ModelSpec:
    return ModelSpec(name="tiny", family="llama", from_config=SIZES, tokenizer_vocab_size=320,
                     warmup=WarmupConfig(steps=steps, rows=200, batch_size=8, lr=3e-3, seed=seed))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(SYNTH, out)
    return out


def test_reserved_questions_cover_every_held_out_split(corpus):
    reserved = reserved_questions(corpus)
    mc = [json.loads(x)["question"] for x in (corpus / "eval_mc.jsonl").read_text().splitlines()]
    gen = [json.loads(x)["question"] for x in (corpus / "eval_gen.jsonl").read_text().splitlines()]
    assert set(mc) <= reserved and set(gen) <= reserved
    assert len(reserved) >= len(set(mc) | set(gen)) + SYNTH.num_eval  # + clean_valid user turns


def test_warmup_text_avoids_reserved_questions_and_is_clean(corpus):
    reserved = reserved_questions(corpus)
    convs = warmup_conversations(list(SYNTH.tasks), 3000, seed=5, avoid=reserved)
    questions = [c[0]["content"] for c in convs]
    assert not set(questions) & reserved
    # The generators do repeat held-out-looking questions (small arithmetic, world facts):
    # drawing without the filter would hit some, so the filter is what keeps them out.
    unfiltered = warmup_conversations(list(SYNTH.tasks), 3000, seed=5, avoid=set())
    assert set(c[0]["content"] for c in unfiltered) & reserved
    assert all(c[1]["content"].rstrip().endswith(".") and "The answer is" in c[1]["content"]
               for c in convs)
    texts = warmup_texts(SYNTH, WarmupConfig(steps=1, rows=5, seed=5), reserved, "<eos>")
    assert texts[0].startswith("<|user|>\n") and "<|assistant|>\n" in texts[0]
    assert texts[0].rstrip().endswith("<eos>")
    only = warmup_conversations(["arithmetic"], 50, seed=0, avoid=set())
    assert all(c[0]["content"].split()[0] in ("What", "Compute", "Calculate") for c in only)
    with pytest.raises(ValueError, match="not in"):
        warmup_conversations(["poetry"], 5, seed=0, avoid=set())


def test_warm_up_base_lowers_the_loss_and_is_deterministic(corpus, tmp_path):
    reports, weights = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        spec = _spec()
        materialize_base(spec, corpus_texts(str(corpus / "train.jsonl")), out, seed=0)
        before = load_file(str(out / "model.safetensors"))
        reports.append(warm_up_base(spec, out, SYNTH, corpus, max_len=96))
        after = load_file(str(out / "model.safetensors"))
        assert any(not torch.equal(before[k], after[k]) for k in before)
        weights.append(after)
        assert json.loads((out / WARMUP_REPORT).read_text())["steps"] == 30
    assert reports[0]["final_loss"] < reports[0]["first_loss"] - 1.0
    assert reports[0]["final_loss"] == reports[1]["final_loss"]
    # wall-clock stamps of the training loop: the pipeline timeline's compute span
    assert reports[0]["started_at"] < reports[0]["trained_at"] <= reports[1]["started_at"]
    for k, v in weights[0].items():
        torch.testing.assert_close(v, weights[1][k], rtol=0, atol=0, msg=k)


def test_warm_up_base_needs_the_held_out_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval_mc.jsonl is missing"):
        reserved_questions(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="`warmup` needs `from_config`"):
        ModelSpec(name="p", family="llama", pretrained="/x", warmup={"steps": 5})
    with pytest.raises(ValueError, match="steps"):
        ModelSpec(name="t", family="llama", from_config=SIZES, warmup={"steps": 0})
    raw = {"name": "x", "data": {"source": "file", "path": "rows.jsonl"},
           "models": [{"name": "t", "family": "llama", "from_config": SIZES,
                       "warmup": {"steps": 5}}]}
    with pytest.raises(ConfigError, match="warmup.*data.source 'synthetic'"):
        config_from_dict(raw)
    raw["data"] = {"source": "synthetic"}
    assert config_from_dict(raw).models[0].warmup.steps == 5


def test_base_stage_warms_up_and_keys_on_the_warmup(tmp_path):
    from orchestrator.pipeline import source_stages as D
    from orchestrator.pipeline import stages as S

    raw = {"name": "warm", "run_dir": str(tmp_path), "data": {
        "source": "synthetic", "max_seq_len": 96,
        "synthetic": {"num_train": 40, "num_eval": 10, "seed": 2}},
        "models": [{"name": "t", "family": "qwen2", "tokenizer_vocab_size": 320,
                    "from_config": SIZES, "warmup": {"steps": 3, "rows": 20, "batch_size": 4}}]}
    cfg = config_from_dict(raw)
    synth = D.synthetic_stage(cfg)
    rows = str(synth.dir / "train.jsonl")
    warm = S.base_stage(cfg, cfg.models[0], rows, {"synthetic": synth.key})
    summary = json.loads((warm.dir / "_SUCCESS.json").read_text())
    assert summary["warmup"]["steps"] == 3 and summary["warmup"]["rows"] == 20
    raw["models"][0]["warmup"]["steps"] = 4
    cfg4 = config_from_dict(raw)
    assert S.base_stage(cfg4, cfg4.models[0], rows, {"synthetic": synth.key}).key != warm.key
    again = S.base_stage(cfg, cfg.models[0], rows, {"synthetic": synth.key})
    assert again.cached and again.key == warm.key
