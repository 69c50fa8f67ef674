"""data.limit draws a seeded random (optionally stratified) sample; train.validation_size
holds out a validation split for every data source and is part of the stage keys."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from orchestrator.config import DataConfig, config_from_dict
from orchestrator.data.loading import corpus_texts, iter_source_rows
from orchestrator.data.sampling import plan_split, read_selection, sample_rows
from orchestrator.pipeline import source_stages as D


def _grouped_rows(sizes: dict[str, int]) -> list[dict]:
    """Rows stored grouped by source, like the Tulu v2 mixture."""
    rows = []
    for src, n in sizes.items():
        rows += [{"dataset": src, "prompt": f"{src} question {i}", "completion": f"answer {i}"}
                 for i in range(n)]
    return rows


def _write_jsonl(path, rows, bad_lines=()):
    lines = [json.dumps(r) for r in rows]
    for at in sorted(bad_lines):
        lines.insert(at, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plan_is_seeded_sorted_and_disjoint():
    a = plan_split(1000, limit=100, validation_size=20, seed=3)
    b = plan_split(1000, limit=100, validation_size=20, seed=3)
    c = plan_split(1000, limit=100, validation_size=20, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.valid, b.valid)
    assert not np.array_equal(a.train, c.train)
    assert len(a.train) == 100 and len(a.valid) == 20
    assert np.all(np.diff(a.train) > 0) and np.all(np.diff(a.valid) > 0)
    assert not set(a.train.tolist()) & set(a.valid.tolist())
    assert a.train.min() >= 0 and a.train.max() < 1000


def test_limit_is_not_the_first_rows_of_a_grouped_source():
    strata = ["a"] * 500 + ["b"] * 500
    plan = plan_split(1000, limit=100, seed=0)
    from_b = sum(strata[i] == "b" for i in plan.train.tolist())
    # The first 100 rows would all be "a"; a uniform sample has ~50 from "b" (sd 5).
    assert 30 <= from_b <= 70
    assert plan.train.tolist() != list(range(100))


def test_stratified_sample_and_validation_are_proportional():
    strata = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    plan = plan_split(1000, limit=100, validation_size=50, seed=0, strata=strata)
    train = Counter(strata[i] for i in plan.train.tolist())
    valid = Counter(strata[i] for i in plan.valid.tolist())
    assert train == {"a": 60, "b": 30, "c": 10}
    assert valid == {"a": 30, "b": 15, "c": 5}
    assert not set(plan.train.tolist()) & set(plan.valid.tolist())
    assert plan.strata["c"] == {"rows": 100, "valid": 5, "train": 10}


def test_stratified_allocation_uses_largest_remainders():
    strata = ["a"] * 5 + ["b"] * 3 + ["c"] * 2  # 7 draws: exact 3.5 / 2.1 / 1.4
    plan = plan_split(10, limit=7, seed=0, strata=strata)
    assert Counter(strata[i] for i in plan.train.tolist()) == {"a": 4, "b": 2, "c": 1}


def test_limit_above_the_row_count_keeps_every_row():
    assert plan_split(5, limit=50, seed=0).train.tolist() == [0, 1, 2, 3, 4]


def test_validation_larger_than_the_source_is_refused():
    with pytest.raises(ValueError, match="train.validation_size=10"):
        plan_split(10, limit=None, validation_size=10)


def test_iter_source_rows_samples_and_keeps_source_row_numbers(tmp_path):
    rows = _grouped_rows({"a": 40, "b": 40})
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig(source="file", path=str(path), limit=10, limit_seed=7)
    got = list(iter_source_rows(cfg))
    expected = plan_split(80, limit=10, seed=7).train.tolist()
    assert [n for n, _ in got] == expected
    assert all(row == rows[n] for n, row in got)  # the row numbered n is source row n
    again = list(iter_source_rows(cfg))
    assert again == got
    other = list(iter_source_rows(cfg.model_copy(update={"limit_seed": 8})))
    assert [n for n, _ in other] != expected


def test_stratified_option_reads_the_source_column(tmp_path):
    rows = _grouped_rows({"a": 60, "b": 30, "c": 10})
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig(source="file", path=str(path), limit=20, stratify_by="dataset")
    got = [row["dataset"] for _, row in iter_source_rows(cfg)]
    assert Counter(got) == {"a": 12, "b": 6, "c": 2}


def test_unparseable_rows_keep_their_numbers_in_the_sample(tmp_path):
    rows = _grouped_rows({"a": 30})
    path = _write_jsonl(tmp_path / "rows.jsonl", rows, bad_lines=[5])
    cfg = DataConfig(source="file", path=str(path), limit=31, limit_seed=0)  # every line
    got = list(iter_source_rows(cfg))
    assert [n for n, _ in got] == list(range(31))
    assert type(got[5][1]).__name__ == "RowRejected"


def test_sample_rows_reads_the_source_twice_without_holding_it():
    opened = []

    def open_rows():
        opened.append(1)
        return iter(range(100))

    picked = list(sample_rows(open_rows, limit=5, seed=1))
    assert len(opened) == 2 and [n for n, _ in picked] == [r for _, r in picked]


def _file_cfg(tmp_path, **train):
    rows = _grouped_rows({"a": 60, "b": 40})
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    return config_from_dict({
        "name": "samp", "run_dir": str(tmp_path / "runs"),
        "data": {"source": "file", "path": str(path), "limit": 50, "stratify_by": "dataset"},
        "models": [{"name": "m", "family": "llama", "pretrained": "org/m"}],
        "train": train,
    }), rows


def test_every_file_source_gets_a_validation_split_in_the_stage_key(tmp_path):
    cfg, rows = _file_cfg(tmp_path, validation_size=10)
    train_path, valid_path, ident = D.source_rows(cfg, None)
    assert valid_path is not None and "sample" in ident
    train = list(iter_source_rows(cfg.data, train_path))
    valid = list(iter_source_rows(cfg.data, valid_path))
    assert len(train) == 50 and len(valid) == 10
    assert not {n for n, _ in train} & {n for n, _ in valid}
    assert all(row == rows[n] for n, row in train + valid)
    assert Counter(r["dataset"] for _, r in valid) == {"a": 6, "b": 4}
    # corpus_texts (the tokenizer corpus) reads the same training sample.
    assert len(list(corpus_texts(train_path))) == 50
    # Rerun: the same stage, cached; another validation size: another key.
    assert D.source_rows(cfg, None)[2] == ident
    cfg2, _ = _file_cfg(tmp_path, validation_size=12)
    assert D.source_rows(cfg2, None)[2] != ident
    source, picked = read_selection(valid_path)
    assert source["path"] == cfg.data.path and len(picked) == 10


def test_without_validation_size_a_file_source_is_passed_through(tmp_path):
    cfg, _ = _file_cfg(tmp_path)
    path, valid, ident = D.source_rows(cfg, None)
    assert path == cfg.data.path and valid is None and "sample" not in ident


def test_synthetic_validation_is_capped_at_validation_size(tmp_path):
    cfg = config_from_dict({
        "name": "syn", "run_dir": str(tmp_path / "runs"),
        "data": {"source": "synthetic", "synthetic": {"num_train": 40, "num_eval": 30}},
        "models": [{"name": "m", "family": "llama", "pretrained": "org/m"}],
        "train": {"validation_size": 7},
    })
    synthetic = D.synthetic_stage(cfg)
    _, valid_default, ident_default = D.source_rows(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"validation_size": 0})}),
        synthetic)
    _, valid, ident = D.source_rows(cfg, synthetic)
    assert ident != ident_default and ident["synthetic"] == ident_default["synthetic"]
    assert len(list(iter_source_rows(cfg.data, valid))) == 7
    assert len(list(iter_source_rows(cfg.data, valid_default))) > 7
