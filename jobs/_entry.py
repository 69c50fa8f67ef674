"""The one body behind every `python -m jobs.X --config ... [overrides]` entry point."""

from __future__ import annotations

import argparse

from orchestrator.cli import main


def entry(prog: str, command: str, until: str | None = None, argv: list[str] | None = None,
          flags: tuple[str, ...] = ()) -> int:
    """Parse `--config` and dotted overrides, then run `lethe <command>` (up to `until`,
    with `flags`, e.g. run's --preflight)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. partition.rho=0.6")
    args = p.parse_args(argv)
    return main([command, args.config, *args.overrides, *(["--until", until] if until else []),
                 *flags])
