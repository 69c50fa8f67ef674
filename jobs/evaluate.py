"""Entry point for `ray job submit`: everything up to evaluation (cached stages are skipped).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.evaluate --config configs/demo.yaml [key.path=value ...]
"""

import sys

from jobs._entry import entry

if __name__ == "__main__":
    sys.exit(entry("jobs.evaluate", "run", until="evaluate"))
