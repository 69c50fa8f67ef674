"""Hub datasets are pinned to the commit they resolve to on first use (issue 12: "hub ids are
unpinned; record the resolved revision"), like hub models (tests/test_hub_revision.py).

No network: the resolver and `datasets.load_dataset` are replaced by fakes; a "hub" whose
default branch moves is a resolver that answers another commit.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_configs import TINY

from orchestrator.config import ConfigError, DataConfig, ExperimentConfig
from orchestrator.data import loading, read_tokens
from orchestrator.data.errors import DataError
from orchestrator.pipeline import source_stages as D
from orchestrator.pipeline import stages as S

SHA_1 = "1" * 40
SHA_2 = "2" * 40
REPO = "org/noisy.v2"  # a dot in the name: once mistaken for a file suffix

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. The answer is {2 * i}."}]}
        for i in range(24)]


class FakeHub:
    """The resolver's answers (the default branch's commit, which a test can move) and the
    `load_dataset` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, head: str = SHA_1) -> None:
        import datasets

        self.head = head
        self.resolved: list[tuple[str, str | None]] = []
        self.loads: list[dict] = []
        monkeypatch.setattr(loading, "resolve_dataset_revision", self.resolve)
        monkeypatch.setattr(datasets, "load_dataset", self.load_dataset)

    def resolve(self, repo_id: str, revision: str | None = None, **kw) -> str | None:
        self.resolved.append((repo_id, revision))
        return self.head

    def load_dataset(self, path: str, split: str | None = None, **kw):
        import datasets

        self.loads.append({"path": path, "split": split, **kw})
        return datasets.Dataset.from_list(ROWS)


def _cfg(run_dir: Path, **data) -> ExperimentConfig:
    raw = json.loads(json.dumps(TINY))
    raw["run_dir"] = str(run_dir)
    raw["data"] = {"source": "hf", "path": REPO, "max_seq_len": 96, **data}
    return ExperimentConfig.model_validate(raw)


def _recorded(cfg: ExperimentConfig) -> list[dict]:
    return [json.loads(p.read_text()) for p in (S.stages_root(cfg) / "dataset").glob("*/_SUCCESS.json")]


def test_first_use_records_the_commit(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    cfg = _cfg(tmp_path / "runs")
    rows, valid, ident = D.source_rows(cfg, None)
    assert hub.resolved == [(REPO, None)]
    [record] = _recorded(cfg)
    assert record["revision"] == SHA_1 and record["dataset"] == REPO
    assert ident == {"dataset": REPO, "split": "train", "revision": SHA_1}
    assert rows == f"hf://datasets/{REPO}@{SHA_1}" and valid is None


def test_a_later_run_keeps_the_recorded_commit_after_the_hub_moves(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    cfg = _cfg(tmp_path / "runs")
    first = D.source_rows(cfg, None)
    hub.head = SHA_2  # the default branch moves on the hub
    again = D.source_rows(_cfg(tmp_path / "runs"), None)
    assert again == first and again[2]["revision"] == SHA_1
    assert hub.resolved == [(REPO, None)]  # the record answered; the hub was not asked again
    # A fresh run directory pins what the branch points at now.
    assert D.source_rows(_cfg(tmp_path / "other"), None)[2]["revision"] == SHA_2


def test_a_requested_revision_is_resolved_and_recorded_on_its_own(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, head=SHA_2)
    cfg = _cfg(tmp_path / "runs", revision="v2")
    assert D.source_rows(cfg, None)[2]["revision"] == SHA_2
    assert hub.resolved == [(REPO, "v2")]
    assert [r["requested"] for r in _recorded(cfg)] == ["v2"]
    # The same request written as a hub path names the same record and the same data.
    same = D.source_rows(_cfg(tmp_path / "runs", path=f"hf://datasets/{REPO}@v2"), None)
    assert same == D.source_rows(cfg, None) and len(hub.resolved) == 1


def test_the_commit_names_the_downstream_keys_and_is_what_load_dataset_gets(tmp_path, monkeypatch):
    """Two commits give two base and two tokens keys; every load (the tokenizer's corpus,
    the tokens stage) asks load_dataset for the recorded commit."""
    hub = FakeHub(monkeypatch)
    keys, tables = {}, {}
    for sha in (SHA_1, SHA_2):
        hub.head, hub.loads = sha, []
        cfg = _cfg(tmp_path / sha[:1])
        rows, _, ident = D.source_rows(cfg, None)
        base = S.base_stage(cfg, cfg.models[0], rows, ident)
        tokens = S.tokens_stage(cfg, base, rows, ident, split="train")
        keys[sha] = (base.key, tokens.key)
        inputs = json.loads((tokens.dir / "inputs.json").read_text())
        assert inputs["rows"]["revision"] == sha
        assert hub.loads and all(c["path"] == REPO and c["revision"] == sha for c in hub.loads), hub.loads
        tables[sha] = read_tokens(tokens.dir / "tokens.parquet").num_rows
    assert keys[SHA_1][0] != keys[SHA_2][0] and keys[SHA_1][1] != keys[SHA_2][1]
    assert tables[SHA_1] == tables[SHA_2] == len(ROWS)


def test_the_sample_stage_loads_the_recorded_commit(tmp_path, monkeypatch):
    """With a validation split the rows travel as selection files: both read the commit."""
    hub = FakeHub(monkeypatch)
    raw_cfg = _cfg(tmp_path / "runs")
    cfg = raw_cfg.model_copy(update={"train": raw_cfg.train.model_copy(update={"validation_size": 4})})
    rows, valid, ident = D.source_rows(cfg, None)
    assert ident == {"sample": ident["sample"]}
    inputs = json.loads((S.stages_root(cfg) / "sample" / ident["sample"] / "inputs.json").read_text())
    assert inputs["rows"]["revision"] == SHA_1
    hub.loads = []
    got = [r for _, r in loading.iter_source_rows(cfg.data, valid)]
    got += [r for _, r in loading.iter_source_rows(cfg.data, rows)]
    assert len(got) == len(ROWS)
    assert hub.loads and all(c["revision"] == SHA_1 for c in hub.loads), hub.loads


def test_an_unresolvable_name_is_not_recorded_and_a_later_run_pins_it(tmp_path, monkeypatch, caplog):
    hub = FakeHub(monkeypatch, head=None)
    cfg = _cfg(tmp_path / "runs")
    rows, _, ident = D.source_rows(cfg, None)
    assert ident == {"dataset": REPO, "split": "train"} and rows == f"hf://datasets/{REPO}"
    assert _recorded(cfg) == [] and "could not be resolved" in caplog.text
    hub.head = SHA_1
    assert D.source_rows(cfg, None)[2]["revision"] == SHA_1


def test_local_data_is_never_pinned(tmp_path, monkeypatch):
    import datasets

    hub = FakeHub(monkeypatch)
    local = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(local))
    cfg = _cfg(tmp_path / "runs", path=str(local))
    ident = D.source_rows(cfg, None)[2]
    assert "revision" not in ident and hub.resolved == []
    with pytest.raises(DataError, match="data.revision='main'.*is local"):
        D.source_rows(_cfg(tmp_path / "runs", path=str(local), revision="main"), None)


@pytest.mark.parametrize("data, match", [
    ({"source": "file", "path": "rows.jsonl", "revision": "main"}, "applies to data.source 'hf'"),
    ({"source": "hf", "path": REPO, "revision": "../main"}, "revision"),
    ({"source": "hf", "path": REPO, "revision": "a..b"}, "not a branch, tag or commit"),
    ({"source": "hf", "path": REPO, "revision": ""}, "revision"),
])
def test_data_revision_is_validated(data, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        DataConfig.model_validate(data)


def test_resolver_reads_the_local_cache_offline_and_the_hub_online(tmp_path, monkeypatch):
    import huggingface_hub

    refs = tmp_path / "hub" / ("datasets--" + REPO.replace("/", "--")) / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA_1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve = loading.resolve_dataset_revision
    assert resolve(REPO, cache_dir=tmp_path / "hub") == SHA_1
    assert resolve(REPO, "c" * 40, cache_dir=tmp_path / "hub") == "c" * 40  # a commit pins
    assert resolve("org/unknown", cache_dir=tmp_path / "hub") is None  # offline: never the hub
    assert resolve("../../etc", cache_dir=tmp_path / "hub") is None

    asked = []

    def dataset_info(self, repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return SimpleNamespace(sha=SHA_2)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    assert resolve(REPO, cache_dir=tmp_path / "hub") == SHA_1  # the cache answers first
    assert resolve("org/other", "main", cache_dir=tmp_path / "hub") == SHA_2
    assert asked == [("org/other", "main")]
