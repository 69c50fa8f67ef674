"""Entry point for `ray job submit`: a Ray Tune sweep over lambda and rho.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.tune --config configs/demo.yaml [key.path=value ...]
"""

import sys

from jobs._entry import entry

if __name__ == "__main__":
    sys.exit(entry("jobs.tune", "tune", until=None))
