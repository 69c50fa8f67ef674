"""prepare_dataset: source rows -> tokens.parquet + rejects.jsonl + report.json.

Bad rows never stop the run on their own: each is recorded with its row number, reason
and detail, and only a rejected fraction above `data.max_rejected_fraction` raises
DataError (after rejects.jsonl and report.json are written, so the cause can be read).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cache import atomic_path, atomic_write_json
from orchestrator.config import DataConfig
from orchestrator.data.chat_format import (
    FormattedSample,
    check_tokenizer_for_template,
    conversation_from_row,
    format_sample,
)
from orchestrator.data.errors import DataError, RowRejected
from orchestrator.data.loading import iter_source_rows
from orchestrator.data.token_masks import tokenize_samples

TOKENS_FILE = "tokens.parquet"
REJECTS_FILE = "rejects.jsonl"
REPORT_FILE = "report.json"
_BATCH_ROWS = 512  # rows per tokenizer call: large enough for the Rust batch path


@dataclass
class DataReport:
    tokens_path: Path
    rejects_path: Path
    report_path: Path
    num_rows: int
    num_accepted: int
    num_rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    num_tokens: int = 0
    num_response_tokens: int = 0
    num_noise_tokens: int = 0
    has_noise_mask: bool = False


def _list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list<value_type> Arrow column built from ragged numpy arrays without Python lists."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


class _Accumulator:
    """Accepted rows, held as compact numpy arrays (~6 bytes per token) until written."""

    def __init__(self) -> None:
        self.sample_ids: list[int] = []
        self.source_ids: list[str | None] = []
        self.input_ids: list[np.ndarray] = []
        self.response: list[np.ndarray] = []
        self.noise: list[np.ndarray | None] = []
        # row -> its synthetic corruption kind (wrong_value / filler / typo), so the
        # partition can report noise detection per kind
        self.noise_kinds: dict[int, str] = {}
        self.truncated = 0

    def table(self) -> pa.Table:
        cols: dict[str, pa.Array] = {
            "sample_id": pa.array(self.sample_ids, type=pa.int64()),
            "input_ids": _list_array(self.input_ids, pa.int32()),
            "response_mask": _list_array(self.response, pa.int8()),
        }
        if any(n is not None for n in self.noise):
            filled = [
                n if n is not None else np.zeros(len(ids), np.int8)
                for n, ids in zip(self.noise, self.input_ids, strict=True)
            ]
            cols["noise_mask"] = _list_array(filled, pa.int8())
        if self.noise_kinds:  # null for clean rows
            cols["noise_kind"] = pa.array([self.noise_kinds.get(s) for s in self.sample_ids],
                                          type=pa.string())
        cols["num_tokens"] = pa.array([len(a) for a in self.input_ids], type=pa.int32())
        if any(s is not None for s in self.source_ids):
            cols["source_id"] = pa.array(self.source_ids, type=pa.string())
        return pa.table(cols)


def _percentiles(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    qs = np.percentile(lengths, [50, 90, 95, 99])
    return {
        "min": int(lengths.min()),
        "p50": float(qs[0]),
        "p90": float(qs[1]),
        "p95": float(qs[2]),
        "p99": float(qs[3]),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }


def _flush(
    pending: list[tuple[int, str | None, FormattedSample]],
    tokenizer: Any,
    cfg: DataConfig,
    acc: _Accumulator,
    rejects: list[dict[str, Any]],
) -> None:
    # Templates that render their own BOS (the usual case for apply_chat_template) must
    # not get a second one from the tokenizer; the paper text is tokenized like
    # open-instruct does, with the tokenizer's special tokens (BOS where it adds one).
    add_special = cfg.chat_template == "paper"
    tokenized = tokenize_samples(tokenizer, [p[2] for p in pending], cfg.max_seq_len, add_special)
    for (row, source_id, _), tok in zip(pending, tokenized, strict=True):
        if not tok.response_mask.any():
            rejects.append({
                "row": row,
                "reason": "no_response_tokens_after_truncation",
                "detail": f"no assistant token within the first {cfg.max_seq_len} tokens",
            })
            continue
        acc.sample_ids.append(row)
        acc.source_ids.append(source_id)
        acc.input_ids.append(tok.input_ids)
        acc.response.append(tok.response_mask)
        acc.noise.append(tok.noise_mask)
        acc.truncated += int(tok.truncated)
    pending.clear()


def _check_row_size(conv: Any, max_chars: int | None) -> None:
    """Reject a row whose message text exceeds data.max_row_chars before it is formatted
    and tokenized (JSONL lines are bounded earlier, while being read)."""
    if not max_chars:
        return
    chars = sum(len(m["content"]) for m in conv.messages)
    if chars > max_chars:
        raise RowRejected("row_too_large", f"{chars} characters of message text, more than "
                          f"data.max_row_chars={max_chars}")


def prepare_dataset(
    cfg: DataConfig, tokenizer: Any, out_dir: Path, *, rows_path: str | None = None
) -> DataReport:
    """Load -> chat format -> tokenize; write tokens.parquet, rejects.jsonl, report.json.

    `rows_path` (a file or dataset directory) overrides cfg.path; the synthetic source
    needs it (the generated train.jsonl). Raises DataError when the rejected fraction
    exceeds cfg.max_rejected_fraction, when nothing is accepted, or when the tokenizer
    cannot serve the template (not fast, no eos for 'paper', no chat_template).
    """
    check_tokenizer_for_template(tokenizer, cfg.chat_template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_path, rejects_path, report_path = (out_dir / n for n in (TOKENS_FILE, REJECTS_FILE, REPORT_FILE))

    acc = _Accumulator()
    rejects: list[dict[str, Any]] = []
    pending: list[tuple[int, str | None, FormattedSample]] = []
    num_rows = 0
    for row_no, row in iter_source_rows(cfg, rows_path):
        num_rows += 1
        try:
            if isinstance(row, RowRejected):
                raise row
            conv = conversation_from_row(row, cfg.format, cfg.columns, cfg.roles)
            if isinstance(row.get("noise_kind"), str):
                acc.noise_kinds[row_no] = row["noise_kind"]
            _check_row_size(conv, cfg.max_row_chars)
            pending.append((row_no, conv.source_id, format_sample(conv, tokenizer, cfg.chat_template)))
        except RowRejected as rej:
            rejects.append({"row": row_no, "reason": rej.reason, "detail": rej.detail})
        if len(pending) >= _BATCH_ROWS:
            _flush(pending, tokenizer, cfg, acc, rejects)
    _flush(pending, tokenizer, cfg, acc, rejects)

    rejects.sort(key=lambda r: r["row"])
    with atomic_path(rejects_path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for r in rejects:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    reasons = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    lengths = np.array([len(a) for a in acc.input_ids], dtype=np.int64)
    n_resp = int(sum(int(m.sum()) for m in acc.response))
    n_noise = int(sum(int(m.sum()) for m in acc.noise if m is not None))
    has_noise = any(n is not None for n in acc.noise)
    report = {
        "rows": num_rows,
        "accepted": len(acc.sample_ids),
        "rejected": len(rejects),
        "rejected_fraction": len(rejects) / num_rows if num_rows else 0.0,
        "rejects_by_reason": reasons,
        "truncated": acc.truncated,
        "tokens": {"total": int(lengths.sum()), "response": n_resp, "noise": n_noise if has_noise else None},
        "length_percentiles": _percentiles(lengths),
        "chat_template": cfg.chat_template,
        "max_seq_len": cfg.max_seq_len,
        "files": {"tokens": TOKENS_FILE, "rejects": REJECTS_FILE},
    }
    atomic_write_json(report_path, report)

    tokens_path.unlink(missing_ok=True)  # never leave a stale result beside a failure
    if num_rows == 0:
        raise DataError("the data source has no rows")
    frac = len(rejects) / num_rows
    counts = ", ".join(f"{k}={v}" for k, v in reasons.items())
    if frac > cfg.max_rejected_fraction:
        raise DataError(
            f"rejected {len(rejects)} of {num_rows} rows ({frac:.1%}), more than "
            f"data.max_rejected_fraction={cfg.max_rejected_fraction}: {counts}; "
            f"see {rejects_path}"
        )
    if not acc.sample_ids:
        raise DataError(f"all {num_rows} rows were rejected: {counts}; see {rejects_path}")

    with atomic_path(tokens_path) as tmp:
        pq.write_table(acc.table(), tmp)
    return DataReport(
        tokens_path=tokens_path,
        rejects_path=rejects_path,
        report_path=report_path,
        num_rows=num_rows,
        num_accepted=len(acc.sample_ids),
        num_rejected=len(rejects),
        rejects_by_reason=reasons,
        num_tokens=int(lengths.sum()),
        num_response_tokens=n_resp,
        num_noise_tokens=n_noise,
        has_noise_mask=has_noise,
    )


def read_tokens(path: str | Path) -> pa.Table:
    """The tokenized dataset (a tokens.parquet file, or the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENS_FILE
    if not p.is_file():
        raise DataError(f"tokenized dataset not found: {p}")
    return pq.read_table(p)
