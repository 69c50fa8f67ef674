"""Entry point for `ray job submit`: everything up to training (cached stages are skipped).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.train --config configs/demo.yaml [key.path=value ...]
"""

import sys

from jobs._entry import entry

if __name__ == "__main__":
    sys.exit(entry("jobs.train", "run", until="train"))
