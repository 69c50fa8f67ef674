"""The `lethe` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("lethe: commands are being built", file=sys.stderr)
    return 0
