"""Hub models are pinned to the commit they resolve to on first use (issue 12: "hub ids are
unpinned; record the resolved revision"). No network: a fake Hugging Face cache on disk, and
a mocked hub answer for the online path."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_configs import TINY

from orchestrator.config import ExperimentConfig
from orchestrator.models import loading
from orchestrator.models.loading import resolve_revision

SHA_MAIN = "a" * 40
SHA_V2 = "b" * 40


def _fake_cache(root: Path, repo: str = "org/tiny") -> Path:
    """The layout huggingface_hub writes: refs/<branch> holds the commit, the snapshot folder
    of that commit holds the files."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for ref, sha in (("main", SHA_MAIN), ("v2", SHA_V2)):
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)
        snap = repo_dir / "snapshots" / sha
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text("{}")
    return root


def test_resolve_revision_offline_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _fake_cache(tmp_path / "hub")
    assert resolve_revision("org/tiny", cache_dir=cache) == SHA_MAIN
    assert resolve_revision("org/tiny", "v2", cache_dir=cache) == SHA_V2
    assert resolve_revision("org/tiny", "c" * 40, cache_dir=cache) == "c" * 40  # a commit pins
    assert resolve_revision("org/unknown", cache_dir=cache) is None  # offline: never the hub


def test_resolve_revision_online_asks_the_hub_once_not_cached(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    asked = []

    def model_info(self, repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return SimpleNamespace(sha="d" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    cache = _fake_cache(tmp_path / "hub")
    assert resolve_revision("org/tiny", cache_dir=cache) == SHA_MAIN  # the cache answers first
    assert resolve_revision("org/other", "main", cache_dir=cache) == "d" * 40
    assert asked == [("org/other", "main")]


def test_base_stage_records_the_resolved_revision(tmp_path, monkeypatch):
    """A hub id's base stage records the commit it resolved to; a rerun keeps that record
    (the cached stage is not re-resolved), a local folder records none."""
    from huggingface_hub import constants

    from orchestrator.pipeline.stages import base_stage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_fake_cache(tmp_path / "hub")))
    monkeypatch.chdir(tmp_path)
    raw = json.loads(json.dumps(TINY))
    raw["run_dir"] = str(tmp_path / "runs")
    raw["models"] = [{"name": "hub-model", "family": "llama", "pretrained": "org/tiny"}]
    cfg = ExperimentConfig.model_validate(raw)
    spec = cfg.models[0]

    out = base_stage(cfg, spec, "unused", None)
    summary = json.loads((out.dir / "_SUCCESS.json").read_text())
    assert summary["model_path"] == "org/tiny" and summary["revision"] == SHA_MAIN
    assert not out.cached  # the first run records the stage: it is not a cache hit

    # The hub moves on; the stage keeps the commit of its first use.
    def moved(*a, **k):
        raise AssertionError("a cached base stage must not resolve again")

    monkeypatch.setattr(loading, "resolve_revision", moved)
    again = base_stage(cfg, spec, "unused", None)
    assert again.dir == out.dir and again.cached
    assert json.loads((again.dir / "_SUCCESS.json").read_text())["revision"] == SHA_MAIN


def test_local_folder_is_not_resolved(tmp_path, monkeypatch):
    from orchestrator.pipeline.stages import base_stage

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(loading, "resolve_revision",
                        lambda *a, **k: pytest.fail("a local folder is fingerprinted, not resolved"))
    raw = json.loads(json.dumps(TINY))
    raw["run_dir"] = str(tmp_path / "runs")
    raw["models"] = [{"name": "local", "family": "llama", "pretrained": str(folder)}]
    cfg = ExperimentConfig.model_validate(raw)
    out = base_stage(cfg, cfg.models[0], "unused", None)
    summary = json.loads((out.dir / "_SUCCESS.json").read_text())
    assert summary["model_path"] == str(folder) and "revision" not in summary


def test_later_stages_load_the_pinned_commit(tmp_path, monkeypatch):
    """After the base stage recorded the commit, the reference / training spec, the scorer and
    the base model's evaluation all ask for that commit, not the moving branch."""
    from huggingface_hub import constants

    from orchestrator.pipeline import evaluate_stage
    from orchestrator.pipeline import stages as S

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_fake_cache(tmp_path / "hub")))
    raw = json.loads(json.dumps(TINY))
    raw["run_dir"] = str(tmp_path / "runs")
    raw["models"] = [{"name": "hub-model", "family": "llama", "pretrained": "org/tiny",
                      "revision": "main"}]
    cfg = ExperimentConfig.model_validate(raw)
    spec = cfg.models[0]
    base = S.base_stage(cfg, spec, "unused", None)

    assert S.base_revision(base) == SHA_MAIN
    assert S.pinned_spec(spec, base).revision == SHA_MAIN  # reference and training jobs
    assert S._spec_of(base).revision == SHA_MAIN  # tokenizer and scorer settings

    # The evaluation of the base model: the commit reaches lm-eval and the eval stage's key.
    seen = {}

    def fake_many(todo, ev_cfg, include, timings=None, revisions=None):
        seen.update(revisions or {})
        return {label: {"t": {"acc": 0.5}} for label in todo}

    monkeypatch.setattr("orchestrator.evaluation.evaluate_many", fake_many)
    outcome = SimpleNamespace(spec=spec, base_model="org/tiny", base_revision=SHA_MAIN, models={})
    track = SimpleNamespace(log_eval=lambda *a, **k: None)
    evaluate_stage.evaluate_outcomes(cfg, [outcome], None, track)
    assert seen == {"hub-model/base/-": SHA_MAIN}
    inputs = [json.loads(p.read_text()) for p in (S.stages_root(cfg) / "eval").glob("*/inputs.json")]
    assert [i.get("revision") for i in inputs] == [SHA_MAIN]


def test_load_model_pins_a_hub_id_but_not_a_local_folder(tmp_path, monkeypatch):
    asked = []

    def from_pretrained(path, **kwargs):
        asked.append((str(path), kwargs.get("revision")))
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", from_pretrained)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for path in ("org/tiny", str(folder)):
        with pytest.raises(RuntimeError, match="stop"):
            loading.load_model(path, revision=SHA_MAIN)
    assert asked == [("org/tiny", SHA_MAIN), (str(folder), None)]
