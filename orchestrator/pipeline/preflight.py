"""Checks that fail a run with a clear message before any compute is spent on it.

- A `pretrained:` value that looks like a local path but does not exist is a typo or an
  unmounted volume, not a hub id: without this check the base stage records it as a hub id,
  marks itself done, and the first model load fails much later (or, with hub access, some
  other model of that name is downloaded).
- The tokens the pipeline trains on must index rows of the model's embedding. The reference
  is trained from the base, so base and reference share one vocabulary by construction; the
  one way in for a mismatch is a tokenizer that is not the model's own: a `tokenizer:`
  override on a pretrained model (the pipeline tokenizes with the tokenizer saved beside the
  model, so the override would be silently ignored), or a checkpoint whose tokenizer has
  more tokens than its embedding rows. Both are checked when the tokens stage loads the
  tokenizer, before any row is tokenized or the reference trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, ExperimentConfig, ModelSpec


def looks_like_path(value: str) -> bool:
    """A string meant as a local path rather than a hub id ("org/name"): it starts with /,
    ./, ../ or ~, has more than one '/', or its parent folder exists here."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", ".."):
        return True
    if value.count("/") > 1:
        return True
    parent = Path(value).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def check_pretrained_path(spec: ModelSpec, where: str = "") -> None:
    """ConfigError when spec.pretrained looks like a local path that does not exist."""
    value = spec.pretrained
    if value is None or not looks_like_path(value):
        return
    path = Path(value).expanduser()
    if not path.exists():
        key = where or f"model '{spec.name}'"
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        hint = f"; the nearest existing folder is {parent}" if parent.exists() else ""
        raise ConfigError(f"{key}.pretrained: local path {value!r} does not exist{hint} "
                          "(a hub id looks like 'org/name'; a path must exist on the machine "
                          "that runs the pipeline, e.g. a mounted shared volume)")
    if path.is_dir() and not (path / "config.json").is_file():
        key = where or f"model '{spec.name}'"
        raise ConfigError(f"{key}.pretrained: {value!r} is a folder without config.json "
                          "(not a saved Hugging Face model)")


def check_models(cfg: ExperimentConfig) -> None:
    """Every model's local paths, all at once, before any stage runs."""
    errors = []
    for i, spec in enumerate(cfg.models):
        try:
            check_pretrained_path(spec, where=f"models[{i}] ('{spec.name}')")
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))


def _model_vocab_size(model_path: str, spec: ModelSpec) -> int | None:
    """The embedding rows the model's config declares; None when the config cannot be read
    here (a hub id without hub access): then the model load reports it."""
    try:
        from transformers import AutoConfig

        kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
        if spec.revision is not None and model_path == spec.pretrained:
            kwargs["revision"] = spec.revision
        config = AutoConfig.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError):
        return None
    text = getattr(config, "get_text_config", lambda: config)()
    size = getattr(text, "vocab_size", None)
    return int(size) if size else None


def check_vocabulary(spec: ModelSpec, model_path: str, tokenizer: Any) -> None:
    """ConfigError when `tokenizer` (the one the tokens stage will use) does not fit the
    model at `model_path`, or when a tokenizer override on a pretrained model differs from
    the model's own tokenizer (which is the one every stage uses)."""
    n_tok = len(tokenizer)
    vocab = _model_vocab_size(model_path, spec)
    if vocab is not None and n_tok > vocab:
        raise ConfigError(
            f"model '{spec.name}': the tokenizer has {n_tok} tokens but the model at "
            f"{model_path} embeds {vocab}: token ids >= {vocab} would index past the "
            "embedding. Use the model's own tokenizer (remove models[].tokenizer) or a model "
            "whose vocabulary matches.")
    override = spec.tokenizer
    if spec.pretrained is not None and override not in (None, "train"):
        from orchestrator.models import load_tokenizer

        other = load_tokenizer(spec, override)
        if other.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"model '{spec.name}': tokenizer {override!r} has a different vocabulary "
                f"({len(other)} tokens) from the model's own tokenizer at {model_path} "
                f"({n_tok} tokens). The pipeline tokenizes, trains, scores and evaluates with "
                "the model's own tokenizer, so the reference and every trained model would "
                "disagree with the override: remove models[].tokenizer, or save the model "
                "with the tokenizer you want and point pretrained at that folder.")
