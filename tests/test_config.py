"""Config loading: YAML, dotted overrides, and errors that name the key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {
    "name": "t",
    "models": [{"name": "m", "family": "llama", "from_config": {"hidden_size": 32}}],
}


def test_every_shipped_config_validates():
    paths = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("configs/paper/*.yaml"))
    assert paths, "no configs shipped"
    for p in paths:
        cfg = load_config(p)
        assert cfg.models, p


def test_overrides_parse_yaml_values_and_nested_keys(tmp_path):
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        ["train.lr=3e-4", "train.methods=[forget]", "partition.rho=0.5", "train.lambda.t_max=0.1",
         "models.0.name=renamed"],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.methods == ["forget"]
    assert cfg.partition.rho == 0.5
    assert cfg.train.lambda_.t_max == 0.1
    assert cfg.models[0].name == "renamed"
    assert cfg.to_dict()["train"]["lambda"]["t_max"] == 0.1  # YAML alias kept on export


def test_unknown_key_names_key_and_allowed_keys():
    raw = apply_overrides(MINIMAL, ["train.lrr=0.1"])
    with pytest.raises(ConfigError) as ei:
        config_from_dict(raw)
    msg = str(ei.value)
    assert "train.lrr" in msg and "did you mean 'lr'" in msg and "micro_batch_size" in msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as ei:
        config_from_dict(apply_overrides(MINIMAL, ["train.methods=[forgett]"]))
    msg = str(ei.value)
    assert "train.methods.0" in msg and "'forget'" in msg and "forgett" in msg


def test_out_of_range_value_is_named():
    with pytest.raises(ConfigError) as ei:
        config_from_dict(apply_overrides(MINIMAL, ["partition.rho=1.5"]))
    assert "partition.rho" in str(ei.value) and "1.5" in str(ei.value)


def test_model_needs_exactly_one_source():
    raw = {"name": "t", "models": [{"name": "m", "family": "llama"}]}
    with pytest.raises(ConfigError, match="exactly one of `pretrained`, `from_config` or `gguf`"):
        config_from_dict(raw)


def test_duplicate_model_names_rejected():
    raw = dict(MINIMAL, models=MINIMAL["models"] * 2)
    with pytest.raises(ConfigError, match="duplicate names"):
        config_from_dict(raw)


def test_malformed_override_and_bad_index():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(MINIMAL, ["train.lr"])
    with pytest.raises(ConfigError, match="not a valid list index"):
        apply_overrides(MINIMAL, ["models.3.name=x"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_config_field_has_a_docstring():
    from pydantic import BaseModel

    from orchestrator.config import ExperimentConfig

    seen, todo, missing = set(), [ExperimentConfig], []
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, field in cls.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{cls.__name__}.{name}")
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                inner = (arg, *getattr(arg, "__args__", ()))
                todo += [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
    assert len(seen) >= 14 and not missing, missing


def test_names_are_declared_once():
    from typing import get_args

    from orchestrator.cli import STAGES
    from orchestrator.config import LambdaConfig, TrainConfig
    from orchestrator.names import METHODS, SCHEDULES, Until
    from orchestrator.training.job import METHODS as JOB_METHODS

    assert STAGES == get_args(Until) and JOB_METHODS is METHODS
    assert TrainConfig().methods == list(METHODS)
    assert get_args(LambdaConfig.model_fields["schedule"].annotation) == SCHEDULES


def test_scoring_packing_is_refused_with_the_reason():
    """An option that would do nothing is refused at validation, naming why and the fix."""
    with pytest.raises(ConfigError, match=r"scoring\.packing.*not implemented.*varlen"):
        config_from_dict({**MINIMAL, "scoring": {"packing": True}})
    assert config_from_dict({**MINIMAL, "scoring": {"packing": False}}).scoring.packing is False
