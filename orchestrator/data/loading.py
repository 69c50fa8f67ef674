"""Reading source rows: JSONL, JSON, Parquet, a saved `datasets` directory or a datasets name.

Rows are numbered from 0 in source order; that number becomes `sample_id` and is used by
rejects.jsonl, so a row keeps its number whether it is accepted or not. A JSONL line that
is not valid JSON is yielded as a `RowRejected` in its place (blank lines are not rows).
Everything is local: `datasets` runs offline here (HF_DATASETS_OFFLINE is set by callers
that must not download).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.config import DataConfig
from orchestrator.data.errors import DataError, RowRejected

_DATASETS_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _iter_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield RowRejected("invalid_json", f"line {lineno}: {exc.msg} at column {exc.colno}")


def _iter_json(path: Path) -> Iterator[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file must hold a list of rows or {{\"data\": [...]}}")
    yield from data


def _iter_parquet(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _load_hf(path: str, split: str) -> Any:
    import datasets

    local = Path(path)
    if local.is_dir() and any((local / m).exists() for m in _DATASETS_DIR_MARKERS):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: split {split!r} not found; available: {sorted(ds)}")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets raises many types; report them under our name
        raise DataError(f"could not load dataset {path!r} (split {split!r}): {exc}") from exc


def _iter_hf(path: str, split: str) -> Iterator[Any]:
    ds = _load_hf(path, split)
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        for i in range(n):
            yield {k: batch[k][i] for k in keys}


def iter_path_rows(path: str | Path, split: str = "train") -> Iterator[Any]:
    """Rows of one local file or dataset directory, by suffix; other names go to datasets."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix == ".jsonl":
            return _iter_jsonl(p)
        if suffix == ".json":
            return _iter_json(p)
        if suffix == ".parquet":
            return _iter_parquet(p)
        raise DataError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if p.is_dir() or not p.suffix:
        return _iter_hf(str(path), split)
    raise DataError(f"data file not found: {p}")


def iter_source_rows(cfg: DataConfig, rows_path: str | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) for the configured source, capped at cfg.limit rows."""
    if rows_path is not None:
        rows = iter_path_rows(rows_path, cfg.split)
    elif cfg.source == "synthetic":
        raise DataError("data.source='synthetic': pass rows_path (the generated train.jsonl)")
    elif cfg.source == "hf" and not Path(str(cfg.path)).is_file():
        rows = _iter_hf(str(cfg.path), cfg.split)
    else:
        rows = iter_path_rows(str(cfg.path), cfg.split)
    return enumerate(itertools.islice(rows, cfg.limit))


def _row_texts(row: Any) -> list[str]:
    if not isinstance(row, dict):
        return []
    texts: list[str] = []
    if isinstance(row.get("messages"), list):
        texts += [m["content"] for m in row["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for key in ("prompt", "completion", "question", "answer"):
        if isinstance(row.get(key), str):
            texts.append(row[key])
    if isinstance(row.get("choices"), list):
        texts += [c for c in row["choices"] if isinstance(c, str)]
    return texts


def corpus_texts(rows_path: str | Path) -> Iterator[str]:
    """Text to train a tokenizer on: one string per row (its message contents joined by
    newlines). Understands training rows (messages, prompt/completion) and the synthetic
    eval rows (question, choices, answer); malformed rows are skipped silently because a
    tokenizer corpus needs no validation, prepare_dataset does that."""
    for row in iter_path_rows(rows_path):
        texts = _row_texts(row)
        if texts:
            yield "\n".join(texts)
