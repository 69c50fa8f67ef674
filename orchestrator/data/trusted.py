"""The trusted clean rows of a token pool: a reference model's data beside the random subset.

The paper trains its reference on a random subset of the (noisy) pool. Token Cleaning
(Pang et al., 2025) assumes a small trusted subset instead. With noise annotations (the
synthetic corpus, or rows that carry `noise_spans`), the rows whose noise mask is all zero
are that trusted set: `reference.subset_source: clean` trains the reference on a seeded
subset of them, of the same size the random subset would have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cache import atomic_write_parquet


def write_clean_rows(tokens_path: str | Path, out_path: str | Path) -> tuple[int, int]:
    """Write the rows of `tokens_path` without any noise token to `out_path`.

    Returns (clean rows, pool rows). Rows without a noise annotation count as clean (the
    tokenizer stage fills their mask with zeros), so the option needs an annotated pool:
    a pool without a noise_mask column is an error, not an all-clean pool.
    """
    tokens_path, out_path = Path(tokens_path), Path(out_path)
    table = pq.read_table(tokens_path)
    if "noise_mask" not in table.column_names:
        raise ValueError(
            f"reference.subset_source 'clean' needs noise annotations, but {tokens_path} has "
            "no noise_mask column (rows need 'noise_spans'; the synthetic corpus has them)"
        )
    sums = np.array([int(np.asarray(m, np.int64).sum()) if m is not None else 0
                     for m in table.column("noise_mask").to_pylist()])
    keep = np.flatnonzero(sums == 0)
    if len(keep) == 0:
        raise ValueError(f"reference.subset_source 'clean': every row of {tokens_path} "
                         "carries noise")
    atomic_write_parquet(table.take(pa.array(keep)), out_path)
    return int(len(keep)), int(table.num_rows)
