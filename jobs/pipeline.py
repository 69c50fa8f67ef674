"""Entry point for `ray job submit`: the whole pipeline.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.pipeline --config configs/demo.yaml [key.path=value ...]
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli import main


def entry(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs.pipeline")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    return main(["run", args.config, *args.overrides])


if __name__ == "__main__":
    sys.exit(entry())
