"""The paper's training data: the authors' released 50k sample, one file of a hub dataset
(`Aligh1380/forgetting-llm-dataset`, `tulu_50k_sample.json`), read at a pinned commit.

No network: `datasets.load_dataset` is swapped for one that reads a local folder shaped like
that repository (the sample beside another file with other columns, as a dataset repository
holds more than one file) and records what it was asked; the resolver answers a fixed commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_configs import TINY

from orchestrator.config import ConfigError, ExperimentConfig, load_config
from orchestrator.data import loading, read_tokens
from orchestrator.data.errors import DataError
from orchestrator.pipeline import source_stages as D
from orchestrator.pipeline import stages as S

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "Aligh1380/forgetting-llm-dataset"
FILE = "tulu_50k_sample.json"
SHA = "3" * 40
# Tulu v2 rows: the mixture's columns (dataset, id, messages)
SAMPLE = [{"dataset": "flan_v2", "id": f"flan_v2_{i}",
           "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
          for i in range(12)]


@pytest.fixture
def hub_folder(tmp_path: Path) -> Path:
    repo = tmp_path / "hub" / "forgetting-llm-dataset"
    (repo / "scores").mkdir(parents=True)
    (repo / FILE).write_text(json.dumps(SAMPLE))  # one JSON document: a list of rows
    # another file of the repository, with other columns: read only if data_files is lost
    (repo / "scores" / "token_scores.jsonl").write_text(
        "".join(json.dumps({"id": i, "score": [0.5]}) + "\n" for i in range(3)))
    return repo


class LocalHub:
    """`load_dataset(HUB_ID, ...)` answered from a local folder; the calls recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
        import datasets

        self.real = datasets.load_dataset
        self.folder = folder
        self.calls: list[dict] = []
        monkeypatch.setattr(datasets, "load_dataset", self.load_dataset)
        monkeypatch.setattr(loading, "resolve_dataset_revision", lambda repo, rev=None, **k: SHA)

    def load_dataset(self, path: str, **kw):
        self.calls.append({"path": path, **kw})
        assert path == HUB_ID, path
        local = {k: v for k, v in kw.items() if k != "revision"}  # a folder has no commits
        return self.real(str(self.folder), **local)


def _cfg(run_dir: Path, **data) -> ExperimentConfig:
    raw = json.loads(json.dumps(TINY))
    raw["run_dir"] = str(run_dir)
    raw["data"] = {"source": "hf", "path": HUB_ID, "data_files": FILE, "format": "messages",
                   "max_seq_len": 96, **data}
    return ExperimentConfig.model_validate(raw)


def test_one_file_of_a_hub_dataset_is_read_at_the_pinned_commit(tmp_path, monkeypatch,
                                                                 hub_folder):
    hub = LocalHub(monkeypatch, hub_folder)
    cfg = _cfg(tmp_path / "runs")
    rows, valid, ident = D.source_rows(cfg, None)
    assert rows == f"hf://datasets/{HUB_ID}@{SHA}/{FILE}" and valid is None
    assert ident == {"dataset": HUB_ID, "split": "train", "data_files": FILE, "revision": SHA}
    assert list(loading.iter_path_rows(rows)) == SAMPLE  # the sample only, in file order
    base = S.base_stage(cfg, cfg.models[0], rows, ident)  # trains a tokenizer on the rows
    tokens = S.tokens_stage(cfg, base, rows, ident, split="train")
    assert read_tokens(tokens.dir / "tokens.parquet").num_rows == len(SAMPLE)
    assert hub.calls and all(c == {"path": HUB_ID, "split": "train", "revision": SHA,
                                   "data_files": FILE} for c in hub.calls), hub.calls


def test_without_data_files_the_key_is_unchanged_and_with_it_differs(tmp_path, monkeypatch,
                                                                     hub_folder):
    LocalHub(monkeypatch, hub_folder)
    whole = D.source_rows(_cfg(tmp_path / "a", data_files=None), None)
    assert whole[2] == {"dataset": HUB_ID, "split": "train", "revision": SHA}
    assert whole[0] == f"hf://datasets/{HUB_ID}@{SHA}"
    one = D.source_rows(_cfg(tmp_path / "a"), None)
    assert one[2] != whole[2]


def test_a_validation_split_of_the_sample_reads_the_file_too(tmp_path, monkeypatch, hub_folder):
    hub = LocalHub(monkeypatch, hub_folder)
    raw = _cfg(tmp_path / "runs").model_dump(mode="json", by_alias=True)
    raw["train"]["validation_size"] = 2
    cfg = ExperimentConfig.model_validate(raw)
    train, valid, _ = D.source_rows(cfg, None)
    got_train = list(loading.iter_path_rows(train))
    got_valid = list(loading.iter_path_rows(valid))
    assert len(got_train) == 10 and len(got_valid) == 2
    assert sorted(r["id"] for r in got_train + got_valid) == sorted(r["id"] for r in SAMPLE)
    assert all(c.get("data_files") == FILE and c["revision"] == SHA for c in hub.calls)


@pytest.mark.parametrize("repo_id, revision, data_files, ref", [
    (HUB_ID, SHA, FILE, f"hf://datasets/{HUB_ID}@{SHA}/{FILE}"),
    (HUB_ID, None, FILE, f"hf://datasets/{HUB_ID}/{FILE}"),
    (HUB_ID, "refs/convert/parquet", "default/train/*.parquet",
     f"hf://datasets/{HUB_ID}@refs%2Fconvert%2Fparquet/default/train/*.parquet"),
    ("org/noisy.v2", SHA, None, f"hf://datasets/org/noisy.v2@{SHA}"),
    ("org/noisy.v2", None, None, "hf://datasets/org/noisy.v2"),
])
def test_hub_ref_round_trip(repo_id, revision, data_files, ref):
    assert loading.hub_ref(repo_id, revision, data_files) == ref
    assert loading.split_hub_ref(ref) == (repo_id, revision)
    assert loading.hub_data_files(ref) == data_files


def test_data_files_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="data.data_files='x.json' names a file inside a hub"):
        load_config(ROOT / "configs/demo.yaml", ["data.data_files=x.json"])
    with pytest.raises(ConfigError, match="no '..', not absolute"):
        _validate({"source": "hf", "path": HUB_ID, "data_files": "../x.json"})
    with pytest.raises(DataError, match="needs a hub id of the form <org>/<name>"):
        loading.hub_ref("squad", None, "x.json")
    local = tmp_path / "rows.json"
    local.write_text(json.dumps(SAMPLE))
    cfg = _cfg(tmp_path / "runs", path=str(tmp_path))
    with pytest.raises(DataError, match="set data.path to the file itself"):
        D.source_rows(cfg, None)


def _validate(data: dict) -> None:
    from orchestrator.config import config_from_dict

    config_from_dict({**json.loads(json.dumps(TINY)), "data": data})


def test_paper_configs_read_the_released_sample_whole():
    paths = sorted((ROOT / "configs/paper").glob("*.yaml"))
    paper = [p for p in paths if not p.name.startswith("smoke")]
    assert len(paper) == 5
    for path in paper:
        d = load_config(path).data
        assert (d.source, d.path, d.data_files, d.split) == ("hf", HUB_ID, FILE, "train"), path
        assert d.limit is None and d.format == "messages", path
        ref = load_config(path).reference
        assert ref.subset_size == 10000 and ref.subset_source == "random", path
        text = path.read_text()
        assert "allenai/tulu-v2-sft-mixture" in text  # the alternative stays documented
