"""Ray Data settings of one stage, on a DataContext copy of its own, and the tokens read.

Every Dataset executes with the DataContext it was created with (`Dataset.context`, shared
by the datasets derived from it). The stage builds its own copy (`stage_context`), creates
its read from it, and every setting below reaches this stage's execution only. The
process-wide context (`DataContext.get_current()`), which other stages and the user's own
code read, is never modified: it is only stood in for by the stage's copy for the one
`read_parquet` call, which picks its reader from the current context (`read_tokens`).

Settings that only help the small embedded instance (a local Ray on a laptop's few cores,
no autoscaler) are applied with `embedded=True` only:

- the read goes through Ray Data's first Parquet reader, which reads the footers on the
  driver: the default reader lists files in a 1-CPU task that starts 32 footer-reading
  actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), each a process on 2 cores; and when the
  scoring actors and a training session hold every CPU slot, a 1-CPU listing task would
  never start;
- read, filter and write tasks reserve no CPU slot (they are I/O; the slots are for the
  scoring actors and the trainings, which the embedded instance counts exactly: a 1-CPU
  task would wait forever behind actors and a training session holding every slot).
  The writes go one at a time (a few milliseconds each), in one reused worker process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from orchestrator.scoring.blocks import INPUT_COLUMNS

# A block (the unit an actor task takes, and a part file) holds about this many scoring
# batches: enough blocks for every actor to get work and a rerun to lose little, few
# enough that each task's overhead stays small.
BATCHES_PER_BLOCK = 2
_CURRENT_LOCK = threading.Lock()


def stage_context(*, embedded: bool, scheduling_strategy: str | None = None) -> Any:
    """A copy of the current DataContext with the stage's settings (None: left as is)."""
    from ray.data import DataContext

    from orchestrator.logs import interactive

    ctx = DataContext.get_current().copy()
    # Bars only on a terminal, as the rest of Lethe's output (logs.configure_console).
    ctx.enable_progress_bars = interactive()
    ctx.print_on_execution_start = interactive()  # off a terminal: the stats file has the plan
    ctx.enable_auto_log_stats = False  # the stage prints its own stats after the write
    # Where the stage's actors and tasks go. Ray Data's default is SPREAD already; setting
    # it (deprecated in 2.60: "Ray Data manages scheduling") only for another strategy.
    if scheduling_strategy is not None and scheduling_strategy != ctx.scheduling_strategy:
        ctx.scheduling_strategy = scheduling_strategy
    if embedded:
        ctx.use_datasource_v2 = False
    return ctx


def light_task_cpus(embedded: bool) -> dict[str, float]:
    """Remote args of the stage's read / filter / write tasks."""
    return {"num_cpus": 0} if embedded else {}


def write_concurrency(embedded: bool) -> int | None:
    """Write tasks at once. Embedded: one (a task reserving no CPU slot is bounded by
    nothing else, and each one more at once is one more worker process to start)."""
    return 1 if embedded else None


def block_rows_for(batch_size: int) -> int:
    """Rows per block: BATCHES_PER_BLOCK scoring batches."""
    return batch_size * BATCHES_PER_BLOCK


def read_tokens(tokens_path: Path, ctx: Any, *, embedded: bool,
                columns: list[str] | None = INPUT_COLUMNS, block_rows: int | None = None) -> Any:
    """The tokens' `columns` (None: all) as a Dataset that executes with `ctx`, in blocks of
    about `block_rows` rows (None: Ray Data's choice). The first reader splits its output
    into that many blocks itself; the default one reads whole row groups (the data stage
    writes one), so its output is cut by a streaming repartition.

    `read_parquet` decides its reader from the current context when called, so the call is
    made with `ctx` current (`DataContext.current`, restored right after); the dataset
    keeps its own copy of `ctx`."""
    import ray
    from ray.data import DataContext

    # One stand-in at a time: two family threads swapping at once would restore each
    # other's copy as the process-wide context.
    with _CURRENT_LOCK, DataContext.current(ctx):
        if embedded:
            rows = _rows(tokens_path) if block_rows else 0
            return ray.data.read_parquet(
                str(tokens_path), columns=columns, **light_task_cpus(embedded),
                override_num_blocks=max(1, -(-rows // block_rows)) if block_rows else None)
        ds = ray.data.read_parquet(str(tokens_path))
        ds = ds if columns is None else ds.select_columns(columns)
        return ds.repartition(target_num_rows_per_block=block_rows) if block_rows else ds


def _rows(tokens_path: Path) -> int:
    import pyarrow.parquet as pq

    from orchestrator.scoring.blocks import token_files

    return sum(pq.ParquetFile(p).metadata.num_rows for p in token_files(tokens_path))
