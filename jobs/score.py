"""Entry point for `ray job submit`: data, reference model, scoring and partition.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.score --config configs/demo.yaml [key.path=value ...]
"""

import sys

from jobs._entry import entry

if __name__ == "__main__":
    sys.exit(entry("jobs.score", "run", until="partition"))
