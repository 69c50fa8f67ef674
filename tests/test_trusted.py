"""The trusted clean rows for the reference (reference.subset_source: clean)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import ReferenceConfig
from orchestrator.data.trusted import write_clean_rows


def _pool(path, masks):
    pq.write_table(pa.table({
        "sample_id": pa.array([10 + i for i in range(len(masks))], pa.int64()),
        "input_ids": pa.array([[1] * len(m or [0]) for m in masks], pa.list_(pa.int32())),
        "response_mask": pa.array([[1] * len(m or [0]) for m in masks], pa.list_(pa.int8())),
        **({"noise_mask": pa.array(masks, pa.list_(pa.int8()))} if masks[0] is not None else {}),
    }), path)
    return path


def test_clean_rows_are_the_rows_without_noise(tmp_path):
    src = _pool(tmp_path / "t.parquet", [[0, 0], [0, 1], [0, 0, 0], [1, 1], [0]])
    n_clean, n_pool = write_clean_rows(src, tmp_path / "out" / "clean.parquet")
    assert (n_clean, n_pool) == (3, 5)
    out = pq.read_table(tmp_path / "out" / "clean.parquet")
    assert out["sample_id"].to_pylist() == [10, 12, 14]
    assert out.column_names == pq.read_table(src).column_names


def test_clean_rows_need_annotations_and_some_clean_row(tmp_path):
    with pytest.raises(ValueError, match="no noise_mask column"):
        write_clean_rows(_pool(tmp_path / "a.parquet", [None, None]), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="every row .* carries noise"):
        write_clean_rows(_pool(tmp_path / "b.parquet", [[1], [0, 1]]), tmp_path / "o.parquet")


def test_reference_config_source():
    assert ReferenceConfig().subset_source == "random"  # the paper's default stays
    assert ReferenceConfig(subset_source="clean").subset_source == "clean"
    with pytest.raises(ValueError, match="subset_source"):
        ReferenceConfig(subset_source="trusted")
