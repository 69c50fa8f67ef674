"""Reading source rows: JSONL, JSON, Parquet, a saved `datasets` directory or a datasets name.

Rows are numbered from 0 in source order; that number becomes `sample_id` and is used by
rejects.jsonl, so a row keeps its number whether it is accepted or not. A JSONL line that
cannot be a row (not UTF-8, not valid JSON, nested too deeply, longer than
`data.max_row_chars`) is yielded as a `RowRejected` in its place (blank lines are not rows);
so are the rows of a Parquet row group that cannot be decoded. A file that cannot be read
at all (a Parquet footer, a JSON document) is a DataError naming the file.
Everything is local: `datasets` runs offline here (HF_DATASETS_OFFLINE is set by callers
that must not download).

A hub dataset pinned to a commit travels as `hf://datasets/<repo id>@<commit>` (the notation
of huggingface_hub's file system; `hub_ref`): every reader of that rows path (the tokenizer
corpus, the tokens stage, the sample stage's selection files) then loads that commit. One
data file of the repository (`data.data_files`, e.g. the paper's `tulu_50k_sample.json`)
travels as its path after the revision, `hf://datasets/<repo id>@<commit>/<file>`, and is all
that is read (a revision holding "/" is written %2F-encoded there, as that notation does).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.config import DataConfig
from orchestrator.data.errors import DataError, RowRejected
from orchestrator.data.row_formats import row_texts
from orchestrator.hub import COMMIT, hub_commit, hub_offline

_DATASETS_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_PREFIX = "hf://datasets/"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _read_line(fh: Any, limit: int) -> tuple[bytes, int]:
    """The next line (at most `limit` bytes kept) and its full length in bytes.

    A line longer than the limit is consumed without holding it in memory, so one runaway
    row cannot exhaust the reader.
    """
    line = fh.readline(limit + 1)
    size = len(line)
    if size > limit and not line.endswith(b"\n"):
        while True:
            chunk = fh.readline(1 << 20)
            size += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
    return line, size


def _iter_jsonl(path: Path, max_row_chars: int | None = None) -> Iterator[Any]:
    # UTF-8 needs at most 4 bytes per character: a line over 4x the limit in bytes is over
    # the limit in characters, so reading stops there.
    byte_limit = max_row_chars * 4 if max_row_chars else 1 << 62
    with path.open("rb") as fh:
        lineno = 0
        while True:
            raw, size = _read_line(fh, byte_limit)
            if not raw:
                return
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not content
            if size > byte_limit:
                yield RowRejected("row_too_large", f"line {lineno}: {size} bytes, more than "
                                  f"data.max_row_chars={max_row_chars} characters")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RowRejected("invalid_utf8", f"line {lineno}: byte 0x{raw[exc.start]:02x} at "
                                  f"byte {exc.start + 1} is not UTF-8 ({exc.reason})")
                continue
            if not line.strip():
                continue
            chars = len(line.rstrip("\r\n"))
            if max_row_chars and chars > max_row_chars:
                yield RowRejected("row_too_large", f"line {lineno}: {chars} characters, more "
                                  f"than data.max_row_chars={max_row_chars}")
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield RowRejected("invalid_json", f"line {lineno}: {exc.msg} at column {exc.colno}")
            except RecursionError:
                yield RowRejected("too_deeply_nested", f"line {lineno}: JSON nested deeper than "
                                  f"the parser's limit (~{sys.getrecursionlimit()} levels)")


def _iter_json(path: Path) -> Iterator[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: byte {exc.start + 1} is not UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested deeper than the parser's limit") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file must hold a list of rows or {{\"data\": [...]}}")
    yield from data


def _iter_parquet(path: Path) -> Iterator[Any]:
    """Rows of a Parquet file, row group by row group. A row group that cannot be decoded
    turns its (remaining) rows into rejects, so the readable groups still count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    first_row = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group]):
                rows = batch.to_pylist()
                done += len(rows)
                yield from rows
        except (pa.ArrowException, OSError) as exc:
            detail = (f"Parquet row group {group} (rows {first_row}-{first_row + n - 1}) "
                      f"cannot be decoded: {exc}")
            for _ in range(n - done):
                yield RowRejected("unreadable_parquet", detail)
        first_row += n


def hub_ref(repo_id: str, revision: str | None, data_files: str | None = None) -> str:
    """The rows path of hub dataset `repo_id` at `revision`: `hf://datasets/<id>@<rev>`
    (`hf://datasets/<id>` for the default branch), then `/<file>` when only one data file
    (or glob) of the repository is read."""
    ref = HUB_PREFIX + repo_id
    if revision:
        ref += "@" + urllib.parse.quote(revision, safe="")
    if data_files:
        if "/" not in repo_id:  # "<id>/<file>" would read as an org/name id
            raise DataError(f"data.data_files={data_files!r} needs a hub id of the form "
                            f"<org>/<name>, not {repo_id!r}")
        ref += "/" + data_files.lstrip("/")
    return ref


def _parse_hub_ref(path: str) -> tuple[str, str | None, str | None]:
    """(repo id, revision, data file) of a `hub_ref`."""
    body = path[len(HUB_PREFIX):]
    if "@" in body:
        repo_id, _, rest = body.partition("@")
        rev, _, file = rest.partition("/")
        return repo_id, urllib.parse.unquote(rev) or None, file or None
    org, _, rest = body.partition("/")
    name, _, file = rest.partition("/")
    return (f"{org}/{name}" if name else org), None, file or None


def split_hub_ref(path: str, revision: str | None = None) -> tuple[str, str | None]:
    """(dataset name, revision) of a rows path: a `hub_ref` carries its own revision, any
    other name gets `revision` (the config's, None = the default branch)."""
    if path.startswith(HUB_PREFIX):
        repo_id, rev, _ = _parse_hub_ref(path)
        return repo_id, rev
    return path, revision


def hub_data_files(path: str) -> str | None:
    """The one data file (or glob) a `hub_ref` reads; None = the dataset's own layout."""
    return _parse_hub_ref(path)[2] if path.startswith(HUB_PREFIX) else None


def resolve_dataset_revision(repo_id: str, revision: str | None = None, *,
                             cache_dir: str | Path | None = None) -> str | None:
    """The commit hub dataset `repo_id` resolves to now (`revision`: a branch, tag or
    commit; None = the default branch).

    A 40-hex commit is returned as it is. Otherwise the local Hugging Face cache is asked
    first (`datasets--<org>--<name>/refs/<revision>` holds the commit the last download
    used: works offline, and is what an offline `load_dataset` would read); then, unless
    HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, the hub. None when neither knows it.
    """
    if COMMIT.match(revision or ""):
        return revision
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        return None  # not a hub id (the refs path below must stay inside the cache)
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    ref = Path(cache_dir) / ("datasets--" + repo_id.replace("/", "--")) / "refs" / (revision or "main")
    try:
        cached = ref.read_text().strip()
    except OSError:
        cached = ""
    if COMMIT.match(cached):
        return cached
    if hub_offline("HF_DATASETS_OFFLINE"):
        return None
    return hub_commit(repo_id, revision, "dataset")


def _load_hf(path: str, split: str, revision: str | None = None,
             data_files: str | None = None) -> Any:
    import datasets

    local = Path(path)
    if local.is_dir() and any((local / m).exists() for m in _DATASETS_DIR_MARKERS):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: split {split!r} not found; available: {sorted(ds)}")
            ds = ds[split]
        return ds
    name, revision = split_hub_ref(path, revision)
    data_files = data_files or hub_data_files(path)
    at = f" at revision {revision}" if revision else ""
    # One data file: datasets' builder for its type reads it, as the split "train"
    files = {"data_files": data_files} if data_files else {}
    of = f" file {data_files!r}" if data_files else ""
    try:
        return datasets.load_dataset(name, split=split, revision=revision, **files)
    except Exception as exc:  # datasets raises many types; report them under our name
        raise DataError(f"could not load dataset {name!r}{of}{at} (split {split!r}): "
                        f"{exc}") from exc


def _iter_hf(path: str, split: str, revision: str | None = None,
             data_files: str | None = None) -> Iterator[Any]:
    ds = _load_hf(path, split, revision, data_files)
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        for i in range(n):
            yield {k: batch[k][i] for k in keys}


def iter_path_rows(path: str | Path, split: str = "train",
                   max_row_chars: int | None = None) -> Iterator[Any]:
    """Rows of one local file or dataset directory, by suffix; other names go to datasets.
    `max_row_chars` bounds a JSONL line before it is parsed (longer = a RowRejected)."""
    from orchestrator.data import sampling

    if sampling.is_selection(path):  # a sampled split (pipeline stage "sample")
        return (row for _, row in sampling.iter_selection(path, max_row_chars))
    if str(path).startswith(HUB_PREFIX):  # a pinned hub dataset (its name may hold a dot)
        return _iter_hf(str(path), split)
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix == ".jsonl":
            return _iter_jsonl(p, max_row_chars)
        if suffix == ".json":
            return _iter_json(p)
        if suffix == ".parquet":
            return _iter_parquet(p)
        raise DataError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if p.is_dir() or not p.suffix:
        return _iter_hf(str(path), split)
    raise DataError(f"data file not found: {p}")


def iter_source_rows(cfg: DataConfig, rows_path: str | None = None) -> Iterator[tuple[int, Any]]:
    """(source row number, row) for the configured source: the rows a selection file keeps,
    or a seeded random sample of cfg.limit rows (orchestrator/data/sampling.py)."""
    from orchestrator.data import sampling

    limit = cfg.max_row_chars
    if sampling.is_selection(rows_path):
        return sampling.iter_selection(str(rows_path), limit)

    def open_rows() -> Iterator[Any]:
        if rows_path is not None:
            return iter_path_rows(rows_path, cfg.split, limit)
        if cfg.source == "synthetic":
            raise DataError("data.source='synthetic': pass rows_path (the generated train.jsonl)")
        if cfg.source == "hf" and not Path(str(cfg.path)).is_file():
            return _iter_hf(str(cfg.path), cfg.split, cfg.revision, cfg.data_files)
        return iter_path_rows(str(cfg.path), cfg.split, limit)

    if cfg.limit is None:
        return enumerate(open_rows())
    return sampling.sample_rows(open_rows, limit=cfg.limit, seed=cfg.limit_seed,
                                stratify_by=cfg.stratify_by)


def _row_texts(row: Any, columns: Any = None, roles: Any = None) -> list[str]:
    if not isinstance(row, dict):
        return []
    texts = row_texts(row, columns, roles) if columns is not None or roles else []
    if texts:
        return texts
    if isinstance(row.get("messages"), list):
        texts += [m["content"] for m in row["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for key in ("prompt", "completion", "question", "answer"):
        if isinstance(row.get(key), str):
            texts.append(row[key])
    if isinstance(row.get("choices"), list):
        texts += [c for c in row["choices"] if isinstance(c, str)]
    return texts or row_texts(row, roles=roles)


def corpus_texts(rows_path: str | Path, split: str = "train", columns: Any = None,
                 roles: Any = None) -> Iterator[str]:
    """Text to train a tokenizer on: one string per row (its message contents joined by
    newlines). Understands training rows in every layout (data.format; `columns`, `roles`:
    data.columns, data.roles) and the synthetic eval rows (question, choices, answer); malformed rows
    are skipped silently because a tokenizer corpus needs no validation, prepare_dataset
    does that. `split`: a hub dataset's split, the one that is tokenized (data.split)."""
    for row in iter_path_rows(rows_path, split):
        texts = _row_texts(row, columns, roles)
        if texts:
            yield "\n".join(texts)
