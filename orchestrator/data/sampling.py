"""Which source rows a run uses: a seeded random sample for `data.limit` (optionally
stratified by a source column) and a held-out validation split of `train.validation_size`.

The paper draws a random 50k sample of the Tulu v2 mixture, which is stored grouped by
source: its first 50k rows are nearly one source, so `data.limit` must never mean "the
first N rows". Rows keep their source row numbers (`sample_id`), so a sampled corpus and
its rejects still point at the source.

A plan is two sorted lists of source row numbers (validation, training), drawn from the
row count (and, when stratified, each row's value of the column) with numpy's seeded
Generator, so the same source, sizes and seed give the same rows on every machine. The
validation rows are drawn first and never appear in the training sample.

The pipeline writes a plan as `*.selection.json` files (a stage output, orchestrator/
pipeline/stages.py) and passes such a file where a rows path goes; loading reads the
source again and yields only the selected rows (`iter_selection`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SELECTION_SUFFIX = ".selection.json"
_FORMAT = "lethe-selection/1"
_NO_VALUE = "<missing>"  # the stratum of rows without the column (or not a mapping)


@dataclass(frozen=True)
class SplitPlan:
    """Source row numbers (sorted) of the validation split and of the training sample."""

    valid: np.ndarray
    train: np.ndarray
    num_rows: int
    strata: dict[str, dict[str, int]] | None = None  # stratum -> {rows, train, valid}


def _allocate(sizes: dict[Hashable, int], k: int) -> dict[Hashable, int]:
    """Proportional allocation of k draws over strata (largest remainder, ties by order of
    first appearance), never more than a stratum holds."""
    total = sum(sizes.values())
    if k >= total:
        return dict(sizes)
    exact = {s: k * n / total for s, n in sizes.items()}
    out = {s: int(np.floor(v)) for s, v in exact.items()}
    order = sorted(sizes, key=lambda s: -(exact[s] - out[s]))  # stable: first-seen wins ties
    left = k - sum(out.values())
    for s in order:
        if left == 0:
            break
        if out[s] < sizes[s]:
            out[s] += 1
            left -= 1
    return out


def _draw(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    if k >= len(pool):
        return pool.copy()
    return np.sort(rng.choice(pool, size=k, replace=False))


def plan_split(num_rows: int, *, limit: int | None, validation_size: int = 0, seed: int = 0,
               strata: Sequence[Hashable] | None = None) -> SplitPlan:
    """Validation rows, then a training sample of at most `limit` rows from the rest.

    With `strata` (one value per row), both draws are proportional to the strata's sizes,
    so a source that makes up 12 % of the rows makes up ~12 % of each split.
    """
    if strata is not None and len(strata) != num_rows:
        raise ValueError(f"strata has {len(strata)} values for {num_rows} rows")
    if validation_size >= num_rows > 0:
        raise ValueError(f"train.validation_size={validation_size} leaves no training rows "
                         f"(the source has {num_rows})")
    rng = np.random.default_rng(seed)
    rows = np.arange(num_rows, dtype=np.int64)
    if strata is None:
        valid = _draw(rng, rows, validation_size)
        rest = np.setdiff1d(rows, valid, assume_unique=True)
        train = rest if limit is None else _draw(rng, rest, limit)
        return SplitPlan(valid, train, num_rows)

    keys = [_NO_VALUE if s is None else s for s in strata]
    order = list(dict.fromkeys(keys))  # strata in order of first appearance
    index = {k: i for i, k in enumerate(order)}
    codes = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    pools = {i: rows[codes == i] for i in range(len(order))}
    sizes = {i: len(p) for i, p in pools.items()}
    v_alloc = _allocate(sizes, validation_size)
    valid_parts, rest = [], {}
    for i in range(len(order)):  # fixed order: the RNG stream does not depend on dict order
        v = _draw(rng, pools[i], v_alloc[i])
        valid_parts.append(v)
        rest[i] = np.setdiff1d(pools[i], v, assume_unique=True)
    t_alloc = ({i: len(r) for i, r in rest.items()} if limit is None
               else _allocate({i: len(r) for i, r in rest.items()}, limit))
    train_parts = [_draw(rng, rest[i], t_alloc[i]) for i in range(len(order))]
    report = {str(order[i]): {"rows": sizes[i], "valid": int(v_alloc[i]), "train": int(t_alloc[i])}
              for i in range(len(order))}
    return SplitPlan(np.sort(np.concatenate(valid_parts)), np.sort(np.concatenate(train_parts)),
                     num_rows, report)


def stratum_of(row: Any, column: str) -> Hashable:
    """A row's value of the stratification column (lists and dicts made hashable)."""
    value = row.get(column) if isinstance(row, dict) else None
    if value is None:
        return _NO_VALUE
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def scan(rows: Iterable[Any], stratify_by: str | None) -> tuple[int, list[Hashable] | None]:
    """One pass over the source: its row count and, when stratified, each row's stratum."""
    if stratify_by is None:
        return sum(1 for _ in rows), None
    strata = [stratum_of(r, stratify_by) for r in rows]
    return len(strata), strata


def sample_rows(open_rows: Callable[[], Iterator[Any]], *, limit: int, seed: int = 0,
                stratify_by: str | None = None) -> Iterator[tuple[int, Any]]:
    """(source row number, row) of a seeded random sample of `limit` rows, read in two
    passes over `open_rows()` (count / strata, then the selected rows)."""
    n, strata = scan(open_rows(), stratify_by)
    chosen = plan_split(n, limit=limit, seed=seed, strata=strata).train
    return _pick(open_rows(), chosen)


def _pick(rows: Iterator[Any], chosen: np.ndarray) -> Iterator[tuple[int, Any]]:
    wanted = iter(chosen.tolist())
    nxt = next(wanted, None)
    for row_no, row in enumerate(rows):
        if nxt is None:
            return
        if row_no == nxt:
            yield row_no, row
            nxt = next(wanted, None)


# ------------------------------------------------------------------------ selection files


def is_selection(path: str | Path | None) -> bool:
    return path is not None and str(path).endswith(SELECTION_SUFFIX)


def write_selection(path: Path, source: dict[str, Any], rows: np.ndarray) -> Path:
    """A selection file: the source to read (`source`: source / path / split) and the row
    numbers to keep."""
    if not str(path).endswith(SELECTION_SUFFIX):
        raise ValueError(f"a selection file must end with {SELECTION_SUFFIX}: {path}")
    body = {"format": _FORMAT, "source": source, "num_rows": int(len(rows)),
            "rows": [int(r) for r in rows]}
    path.write_text(json.dumps(body))
    return path


def read_selection(path: str | Path) -> tuple[dict[str, Any], np.ndarray]:
    body = json.loads(Path(path).read_text())
    if body.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a Lethe selection file (format {body.get('format')!r})")
    return body["source"], np.asarray(body["rows"], dtype=np.int64)


def iter_selection(path: str | Path, max_row_chars: int | None = None) -> Iterator[tuple[int, Any]]:
    """(source row number, row) for the rows a selection file keeps, read from its source."""
    from orchestrator.data.loading import iter_path_rows, iter_source_rows

    source, rows = read_selection(path)
    if source.get("rows_path"):
        it: Iterator[Any] = iter_path_rows(source["rows_path"], source.get("split", "train"),
                                           max_row_chars)
    else:
        from orchestrator.config import DataConfig

        cfg = DataConfig(source=source["source"], path=source["path"],
                         split=source.get("split", "train"), max_row_chars=max_row_chars)
        it = (row for _, row in iter_source_rows(cfg))
    return _pick(it, rows)


def materialize_split(open_rows: Callable[[], Iterator[Any]], source: dict[str, Any],
                      out_dir: Path, *, limit: int | None, validation_size: int, seed: int = 0,
                      stratify_by: str | None = None) -> dict[str, Any]:
    """Plan the split of a source and write it as `train.selection.json` (+
    `valid.selection.json` when validation_size > 0) and `report.json` in out_dir."""
    n, strata = scan(open_rows(), stratify_by)
    plan = plan_split(n, limit=limit, validation_size=validation_size, seed=seed, strata=strata)
    write_selection(out_dir / f"train{SELECTION_SUFFIX}", source, plan.train)
    if validation_size:
        write_selection(out_dir / f"valid{SELECTION_SUFFIX}", source, plan.valid)
    report = {"source_rows": n, "train": len(plan.train), "valid": len(plan.valid),
              "stratify_by": stratify_by, "strata": plan.strata}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def materialize_subset(open_rows: Callable[[], Iterator[Any]], source: dict[str, Any],
                       out_path: Path, *, size: int, seed: int = 0) -> int:
    """A seeded random subset of at most `size` rows of a source, as a selection file
    (caps a held-out split that already exists, e.g. the synthetic clean_valid.jsonl)."""
    n, _ = scan(open_rows(), None)
    rows = plan_split(n, limit=size, seed=seed).train
    write_selection(out_path, source, rows)
    return int(len(rows))
