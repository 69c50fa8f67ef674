"""Errors of the data layer.

`DataError` stops a run (bad source, too many rejects, unusable tokenizer); `RowRejected`
is internal: one source row is skipped, recorded in rejects.jsonl, and the run goes on.
"""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot be prepared; the message names the file, key or counts involved."""


class RowRejected(Exception):
    """One source row is unusable. `reason` is a short stable code counted in report.json."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
