# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test lint bench tune-demo

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(VENV)/bin/lethe run configs/demo.yaml

tune-demo: setup
	$(VENV)/bin/lethe tune configs/tune-demo.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -x -rs --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/partition_bench.py
	$(PY) benchmarks/score_bench.py
	$(PY) benchmarks/token_loss_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/scale_bench.py
