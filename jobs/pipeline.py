"""Entry point for `ray job submit`: the whole pipeline, after the access checks of
`lethe plan --check` (training data, evaluation datasets, models, MLflow with the job's
credentials) pass: a dataset or credential that cannot be opened stops the job before its
first GPU stage, not after the trainings.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.pipeline --config configs/demo.yaml [key.path=value ...]
"""

import sys

from jobs._entry import entry

if __name__ == "__main__":
    sys.exit(entry("jobs.pipeline", "run", until=None, flags=("--preflight",)))
