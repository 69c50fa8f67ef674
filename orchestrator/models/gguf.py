"""GGUF checkpoints as a model source: de-quantized once into a plain HF folder.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=NAME)`, with the `gguf`
package installed) by parsing its metadata in Python and de-quantizing every tensor: about
25 s for a 135 M-parameter file on 2 CPU cores, and the tokenizer parses the file again.
Doing that in every scoring actor, Ray Train worker and lm-eval task would multiply the
cost and make every consumer GGUF-aware. Instead the base stage calls `materialize_gguf`
once; it writes config + safetensors + tokenizer (with the file's chat template) in the
configured dtype, and everything downstream reads that folder like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils.quantization_config import GgufConfig

from orchestrator.cache import file_sha256
from orchestrator.config import ModelSpec
from orchestrator.models.families import FAMILY_MODEL_TYPES, resolve_attn_implementation
from orchestrator.models.tokenizer import fix_pad_token

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCE_FILE = "gguf_source.json"  # provenance written next to the converted model


def gguf_fingerprint(spec: ModelSpec) -> dict[str, str]:
    """Content identity of the spec's GGUF file (sha256 of its bytes, memoised per process).

    The file's location is left out, so the same file installed elsewhere (another venv, a
    cluster node) names the same base stage."""
    if spec.gguf is None:
        raise ValueError(f"model '{spec.name}' has no `gguf` source")
    path = spec.gguf.path()
    return {"name": path.name, "sha256": file_sha256(path)}


def _drop_quantizer(model: PreTrainedModel) -> None:
    """Make the loaded model a plain dense model that save_pretrained accepts.

    Loading through `gguf_file` attaches a GGUF quantizer and a `quantization_config` to the
    config even when every weight was de-quantized; save_pretrained refuses such a model and
    a saved config carrying it would send later loads back to the GGUF path."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_gguf_model(spec: ModelSpec) -> PreTrainedModel:
    """The spec's GGUF model, de-quantized to `spec.gguf.dtype`, checked against the family."""
    assert spec.gguf is not None
    path = spec.gguf.path()
    dtype = _DTYPES[spec.gguf.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        # dequantize=True: never keep packed GGUF blocks (transformers does on Apple MPS
        # with the `kernels` package); they cannot be trained or saved as safetensors.
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        dtype=dtype,
        attn_implementation=resolve_attn_implementation(spec.family, spec.attn_implementation),
    )
    want = FAMILY_MODEL_TYPES[spec.family]
    if model.config.model_type != want:
        raise ValueError(
            f"model '{spec.name}': GGUF file {path} holds a '{model.config.model_type}' model, "
            f"but the spec's family is '{spec.family}' (expects '{want}')"
        )
    _drop_quantizer(model)
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if packed:
        raise ValueError(f"model '{spec.name}': GGUF weights stayed packed ({packed}) after "
                         "loading with dequantize=True; this transformers version cannot "
                         "de-quantize the file")
    return model.to(dtype)


def materialize_gguf(spec: ModelSpec, out_dir: Path) -> str:
    """De-quantize the spec's GGUF file into `out_dir` (config, safetensors, tokenizer with
    the file's chat template); returns `out_dir`. Deterministic in the file's content."""
    assert spec.gguf is not None
    path = spec.gguf.path()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_gguf_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fix_pad_token(tokenizer, spec)
    # GGUF tokenizers carry no length limit; the model's position table is the real one.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    # Keep model and generation config on the tokenizer's pad id (fix_pad_token may have
    # chosen one the file did not name); eos / bos stay as the file says.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = str(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    source = {
        "gguf_file": str(path),
        "package": spec.gguf.package,
        "sha256": file_sha256(path),
        "dtype": spec.gguf.dtype,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return str(out_dir)
