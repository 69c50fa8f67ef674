"""Entry point for `ray job submit`: the whole pipeline.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.pipeline --config configs/demo.yaml [key.path=value ...]
"""

import sys

from jobs._entry import entry

if __name__ == "__main__":
    sys.exit(entry("jobs.pipeline", "run", until=None))
