"""The base class of Lethe's own errors: the CLI prints them as one line, no traceback.

ConfigError, DataError and TrackingError predate it and keep their own bases (ValueError,
RuntimeError) for callers that catch those; `orchestrator.cli` lists them beside this one.
"""

from __future__ import annotations


class LetheError(Exception):
    """A failure Lethe explains itself: the message names the file, stage, key or model."""
