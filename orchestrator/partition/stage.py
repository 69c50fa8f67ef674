"""The partition stage: per-token classes from scores, written beside the tokens.

Two paths with identical results (tested against each other and the method core):
- in memory (corpus up to `in_memory_max_tokens` tokens): gather the flat response scores and
  call `orchestrator.method.partition` directly;
- distributed (larger corpora): Ray Data passes over tokens.parquet, each batch joined with its
  scores by sample_id. Global mode: a histogram pass and a bracket pass find the exact
  threshold and tie cut-off (`threshold.py`), then a map pass writes the class column.
  Per-sample mode needs only the map pass (every sample is partitioned on its own).

Outputs in out_dir: partitioned.parquet (tokens columns + token_class list<int8>: +1/-1 on
response tokens, 0 elsewhere), report.json (partition_stats plus exact counts and the
threshold), histogram.png.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cache import atomic_write_json, atomic_write_parquet, temp_path
from orchestrator.config import PartitionConfig
from orchestrator.method.partition import (
    auroc,
    global_threshold,
    partition_global,
    partition_per_sample,
    partition_stats,
)
from orchestrator.partition.corpus import (
    join_response_scores,
    scores_for,
)
from orchestrator.partition.corpus import score_index as build_score_index
from orchestrator.partition.plots import plot_histogram
from orchestrator.partition.threshold import (
    GlobalCut,
    bracket_from_histogram,
    bracket_members,
    cut_from_bracket,
    histogram_partial,
)
from orchestrator.scoring.blocks import score_files
from orchestrator.scoring.data_context import (
    light_task_cpus,
    read_tokens,
    stage_context,
    write_concurrency,
)

OUTPUT_FILE = "partitioned.parquet"
_STATS_COLUMNS = ["_score", "_class", "_noise", "_kind"]
_STATS_DIR = "_classify_stats"


# ------------------------------------------------------------- noise detection per kind


def noise_kind_names(tokens_path: Path) -> list[str]:
    """The noise kinds named by the tokens' per-sample `noise_kind` column (sorted), or []."""
    if "noise_kind" not in pq.read_schema(tokens_path).names:
        return []
    column = pq.read_table(tokens_path, columns=["noise_kind"])["noise_kind"]
    return sorted(k for k in set(column.to_pylist()) if k)


def token_kind_codes(rs, names: list[str]) -> np.ndarray:
    """int8 per response token: the index in `names` of its sample's noise kind, -1 if none."""
    if not names or "noise_kind" not in rs.table.column_names:
        return np.full(rs.scores.size, -1, dtype=np.int8)
    lookup = {k: i for i, k in enumerate(names)}
    per_sample = np.array([lookup.get(k, -1) for k in rs.table["noise_kind"].to_pylist()], np.int8)
    return np.repeat(per_sample, np.diff(rs.offsets))


def noise_kind_stats(scores: np.ndarray, classes: np.ndarray, noise_mask: np.ndarray,
                     kind_codes: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Per noise kind: how many noise tokens it has, the recall of the negative set on them,
    and the AUROC of -score separating them from the clean tokens (noise_mask == 0; the
    other kinds' noise tokens are left out, so each kind is judged on its own)."""
    noise = np.asarray(noise_mask).astype(bool)
    clean = ~noise
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, dict] = {}
    for code, name in enumerate(names):
        mine = noise & (np.asarray(kind_codes) == code)
        n = int(mine.sum())
        if n == 0:
            continue
        both = mine | clean
        out[name] = {
            "n_noise": n,
            "recall": int(np.count_nonzero(np.asarray(classes)[mine] == -1)) / n,
            "auroc": auroc(-scores[both], mine[both]),
        }
    return out


# ----------------------------------------------------------- per-batch functions (Ray Data)


def _join(table: pa.Table, index: list[dict]):
    return join_response_scores(table, scores_for(table["sample_id"].to_numpy(), index))


def _flat_ids(rs) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(rs.sample_ids, np.diff(rs.offsets)), rs.positions


def _histogram_batch(table: pa.Table, index: list[dict]) -> pa.Table:
    part = histogram_partial(_join(table, index).scores)
    return pa.table({"bins": [part["bins"]], "counts": [part["counts"]], "n": [int(part["n"])],
                     "max": [float(part["max"])]})


def _bracket_batch(table: pa.Table, index: list[dict], bin_index: int) -> pa.Table:
    rs = _join(table, index)
    sids, pos = _flat_ids(rs)
    m = bracket_members(rs.scores, sids, pos, bin_index)
    return pa.table({k: [v] for k, v in m.items()})


def _classify_batch(table: pa.Table, index: list[dict], mode: str, rho: float,
                    cut: dict | None, stride: int, kind_names: list[str]) -> pa.Table:
    rs = _join(table, index)
    if mode == "per_sample":
        classes = partition_per_sample(rs.scores, rs.offsets, rho)
    else:
        sids, pos = _flat_ids(rs)
        rule = GlobalCut(cut["threshold"], cut["k_ties"],
                         tuple(cut["tie_cutoff"]) if cut["tie_cutoff"] is not None else None)
        classes = rule.classify(rs.scores, sids, pos)
    out = rs.with_classes(classes)
    # Flat statistics ride along as one-row-per-sample lists, subsampled every `stride`-th
    # response token of the batch; the driver strips them before writing.
    keep = np.zeros(rs.scores.size, dtype=bool)
    keep[::stride] = True
    owner = np.repeat(np.arange(len(rs.sample_ids)), np.diff(rs.offsets))
    per_sample = np.bincount(owner[keep], minlength=len(rs.sample_ids))
    offs = pa.array(np.concatenate(([0], np.cumsum(per_sample))).astype(np.int32))
    noise = rs.noise if rs.noise is not None else np.zeros(rs.scores.size, dtype=np.int8)
    for name, values, typ in (("_score", rs.scores, pa.float32()), ("_class", classes, pa.int8()),
                              ("_noise", noise, pa.int8()),
                              ("_kind", token_kind_codes(rs, kind_names), pa.int8())):
        out = out.append_column(name, pa.ListArray.from_arrays(offs, pa.array(values[keep], typ)))
    # Exact batch counts on the first row (0 on the others), summed by the driver.
    first = np.arange(out.num_rows) == 0
    for name, count in (("_n_pos", np.count_nonzero(classes == 1)), ("_n_resp", rs.scores.size)):
        out = out.append_column(name, pa.array(np.where(first, int(count), 0).astype(np.int64)))
    return out


def _classify_and_spill(table: pa.Table, stats_dir: str, **kwargs) -> pa.Table:
    """`_classify_batch`, its statistics written to `stats_dir` (one small file per batch)
    instead of riding along: the token rows go to the writer, the statistics to the driver."""
    out = _classify_batch(table, **kwargs)
    keep = [c for c in out.column_names if c not in (*_STATS_COLUMNS, "_n_pos", "_n_resp")]
    one_row = {}
    for c in _STATS_COLUMNS:  # each statistic as one list value: a one-row table
        values = out[c].combine_chunks().flatten()
        one_row[c] = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    for c in ("_n_pos", "_n_resp"):
        one_row[c] = pa.array([int(pa.compute.sum(out[c]).as_py() or 0)], pa.int64())
    one_row["n_samples"] = pa.array([out.num_rows], pa.int64())
    # Named by the batch's first sample_id: the driver reads them back in corpus order.
    first = int(pa.compute.min(out["sample_id"]).as_py()) if out.num_rows else -1
    atomic_write_parquet(pa.table(one_row),
                         Path(stats_dir) / f"{first + 1:020d}-{uuid.uuid4().hex[:8]}.parquet")
    return out.select(keep)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ------------------------------------------------------------------------------ paths


def _in_memory(tokens_path: Path, scores_path: Path, cfg: PartitionConfig, out_path: Path,
               kind_names: list[str]):
    tokens = pq.read_table(tokens_path)
    scores = pa.concat_tables([
        pq.read_table(p, columns=["sample_id", "base_loss", "ref_loss"]) for p in score_files(scores_path)
    ])
    rs = join_response_scores(tokens, scores)
    info: dict = {"path": "in_memory"}
    if cfg.mode == "global":
        t, k_ties = global_threshold(rs.scores, cfg.rho)
        classes = partition_global(rs.scores, cfg.rho)
        info.update(global_threshold=t, k_ties=k_ties)
    else:
        classes = partition_per_sample(rs.scores, rs.offsets, cfg.rho)
    atomic_write_parquet(rs.with_classes(classes), out_path)
    n_pos = int(np.count_nonzero(classes == 1))
    info.update(n_samples=len(rs.sample_ids), exact_n_tokens=int(rs.scores.size), exact_n_positive=n_pos)
    return rs.scores, classes, rs.noise, token_kind_codes(rs, kind_names), info


def _distributed(tokens_path: Path, scores_path: Path, cfg: PartitionConfig, out_path: Path,
                 rows_per_block: int, stride: int, kind_names: list[str]):

    index = build_score_index(scores_path)
    names = pq.read_schema(tokens_path).names
    has_noise = "noise_mask" in names

    embedded = os.environ.get("LETHE_EMBEDDED_RAY") == "1"
    light = light_task_cpus(embedded)

    def tokens_ds(columns: list[str] | None = None, ordered: bool = False):
        # A DataContext copy of this pass's own (scoring/data_context.py), never the
        # process-wide one: with `ordered`, the written parts follow the input's order
        # (a deterministic training row order): blocks of exactly `rows_per_block`
        # consecutive input rows (the last one shorter), each sorted by sample_id (the
        # join), in input order. `preserve_order` keeps the order of blocks and of the
        # write tasks that name the parts; `strict` fixes where the blocks begin. The
        # default (non-strict) repartition only cuts blocks above the target and passes
        # smaller ones through, so the blocks followed whatever the read produced: Ray
        # Data's first Parquet reader (embedded) splits a read task's output into
        # 2 x the cluster's CPUs pieces (45 rows on 4 CPUs: 6,6,6,6,6,5,5,5), and the
        # parts changed with the reader and the cluster's size. Strict rebundles across
        # the read's blocks (in order, as preserve_order delivers them) into exact sizes.
        ctx = stage_context(embedded=embedded)
        ctx.execution_options.preserve_order = ordered
        ds = read_tokens(tokens_path, ctx, embedded=embedded, columns=columns)
        return ds.repartition(target_num_rows_per_block=rows_per_block, strict=ordered)

    info: dict = {"path": "distributed"}
    cut = None
    if cfg.mode == "global":
        columns = ["sample_id", "response_mask"]
        partials = tokens_ds(columns).map_batches(
            _histogram_batch, batch_format="pyarrow", fn_kwargs={"index": index},
            **light).take_all()
        bracket = bracket_from_histogram(partials, cfg.rho)
        members = []
        if bracket.bin >= 0:
            members = tokens_ds(columns).map_batches(
                _bracket_batch, batch_format="pyarrow",
                fn_kwargs={"index": index, "bin_index": bracket.bin}, **light).take_all()
            members = [{k: np.asarray(v) for k, v in m.items()} for m in members]
        rule = cut_from_bracket(bracket, members)
        cut = {"threshold": rule.threshold, "k_ties": rule.k_ties, "tie_cutoff": rule.tie_cutoff}
        info.update(global_threshold=rule.threshold, k_ties=rule.k_ties,
                    bracket_size=int(sum(len(m["score"]) for m in members)))

    # The classify pass writes its Parquet from the workers (no token row passes through
    # the driver) into a temp folder that becomes OUTPUT_FILE (a folder of part files) when
    # complete. Its flat statistics go beside it as one small file per batch.
    tmp = temp_path(out_path)
    stats_dir = out_path.parent / _STATS_DIR
    for stale in (tmp, stats_dir, out_path):
        _remove(stale)
    stats_dir.mkdir(parents=True)
    try:
        mapped = tokens_ds(ordered=True).map_batches(
            _classify_and_spill, batch_format="pyarrow",
            fn_kwargs={"index": index, "mode": cfg.mode, "rho": cfg.rho, "cut": cut,
                       "stride": stride, "kind_names": kind_names, "stats_dir": str(stats_dir)},
            **light)
        mapped.write_parquet(str(tmp), ray_remote_args=light,
                             concurrency=write_concurrency(embedded))
        stats = [pq.read_table(p) for p in sorted(stats_dir.glob("*.parquet"))]
        if not stats or not any(t["n_samples"][0].as_py() for t in stats):
            raise ValueError(f"{tokens_path}: no token rows to partition")
        os.replace(tmp, out_path)
    finally:
        _remove(tmp)
        _remove(stats_dir)
    flat = {c: [t[c].combine_chunks().flatten().to_numpy(zero_copy_only=False) for t in stats]
            for c in _STATS_COLUMNS}
    n_samples, n_pos, n_resp = (sum(int(t[c][0].as_py()) for t in stats)
                                for c in ("n_samples", "_n_pos", "_n_resp"))
    scores, classes, noise, kinds = (np.concatenate(flat[c]) for c in _STATS_COLUMNS)
    info.update(n_samples=n_samples, exact_n_tokens=n_resp, exact_n_positive=n_pos)
    return scores, classes, (noise if has_noise else None), kinds, info


def _total_tokens(tokens_path: Path) -> int:
    names = pq.read_schema(tokens_path).names
    if "num_tokens" in names:
        return int(pq.read_table(tokens_path, columns=["num_tokens"])["num_tokens"].to_numpy().sum())
    col = pq.read_table(tokens_path, columns=["response_mask"])["response_mask"]
    return int(pa.compute.sum(pa.compute.list_value_length(col)).as_py() or 0)


def run_partition(
    tokens_path: Path,
    scores_path: Path,
    cfg: PartitionConfig,
    out_dir: Path,
    *,
    in_memory_max_tokens: int = 50_000_000,
    rows_per_block: int = 1024,
    stats_max_tokens: int = 20_000_000,
) -> dict:
    """Partition every response token (score = base_loss - ref_loss); returns the report.

    Corpora above `in_memory_max_tokens` tokens (all positions) take the distributed path,
    which needs Ray (initialised by the caller). The distributed report's histogram and AUROC
    come from every k-th response token when the corpus exceeds `stats_max_tokens`; counts and
    the threshold are always exact.
    """
    tokens_path, scores_path, out_dir = Path(tokens_path), Path(scores_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / OUTPUT_FILE
    total = _total_tokens(tokens_path)
    kind_names = noise_kind_names(tokens_path)
    if total <= in_memory_max_tokens:
        scores, classes, noise, kinds, info = _in_memory(tokens_path, scores_path, cfg, out_path,
                                                         kind_names)
        stride = 1
    else:
        stride = max(1, math.ceil(total / stats_max_tokens))
        scores, classes, noise, kinds, info = _distributed(
            tokens_path, scores_path, cfg, out_path, rows_per_block, stride, kind_names)
    stats = partition_stats(scores, classes, noise, bins=cfg.histogram_bins)
    if noise is not None and kind_names:
        stats["noise_by_kind"] = noise_kind_stats(scores, classes, noise, kinds, kind_names)
    n_tokens = info.pop("exact_n_tokens")
    n_pos = info.pop("exact_n_positive")
    report = {
        **stats,
        "mode": cfg.mode,
        "rho": cfg.rho,
        "n_tokens": n_tokens,
        "n_positive": n_pos,
        "n_negative": n_tokens - n_pos,
        "positive_fraction": n_pos / n_tokens if n_tokens else 0.0,
        "stats_sample_stride": stride,
        **info,
    }
    if cfg.mode == "global":
        report["threshold"] = report["global_threshold"]
    atomic_write_json(out_dir / "report.json", report)
    plot_histogram(scores, classes, noise, report["threshold"] if cfg.mode == "global" else None,
                   cfg.histogram_bins, out_dir / "histogram.png")
    print(f"partition ({info['path']}, {cfg.mode}, rho={cfg.rho}): {n_pos} positive / "
          f"{n_tokens - n_pos} negative of {n_tokens} response tokens"
          + (f"; threshold {report['threshold']:.6g}" if cfg.mode == "global" else ""))
    return report
