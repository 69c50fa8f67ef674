#!/usr/bin/env bash
# Creates .venv (if missing) and installs Lethe into it. Idempotent: a stamp keyed by the
# hash of pyproject.toml skips the install when nothing changed.
#
# On a machine without CUDA, torch==2.13.0 is installed first: its CPU wheel lies on local
# disk, and installing it before anything else stops pip from pulling a multi-GB CUDA build
# as a dependency of ray/deepspeed/transformers. A GPU machine keeps whatever torch it has
# (or gets pip's default CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.lethe-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
has_cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_cuda=1; fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ "$has_cuda" = 0 ]; then
    echo "[setup] no CUDA device: installing the CPU wheel torch==2.13.0 first"
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
fi
echo "[setup] installing lethe and its dependencies (a few minutes on a fresh machine)"
# DeepSpeed builds from source; its setup imports torch, so keep the already installed torch.
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
