#!/usr/bin/env bash
# Compile check of the GPU kernels for ROCm (gfx90a) with Debian's HIP
# packages; no AMD GPU is needed. CMake's HIP language finds Debian's
# multiarch ROCm layout from cmake 3.31 on, which comes from PyPI into a
# throwaway virtualenv. Usage: bash scripts/check_hip.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/hip}
if ! command -v clang++-15 >/dev/null || [ ! -d /usr/include/hip ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends hipcc >/dev/null
  else
    echo "skipped: Debian's hipcc is not installed (apt-get install hipcc)"
    exit 0
  fi
fi
multiarch=/usr/lib/$(gcc -print-multiarch)
tools="$dir/tools"
[ -x "$tools/bin/cmake" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q "cmake>=3.31,<4"; }
CMAKE_PREFIX_PATH="$multiarch/cmake" "$tools/bin/cmake" -S . -B "$dir/build" -G Ninja \
  -DTOKENMILL_HIP=ON -DTOKENMILL_CUDA=OFF -DTOKENMILL_BUILD_PYTHON=OFF \
  -DCMAKE_HIP_PLATFORM=amd -DCMAKE_HIP_COMPILER=clang++-15 -DCMAKE_HIP_ARCHITECTURES=gfx90a \
  -DCMAKE_HIP_COMPILER_ROCM_LIB="$multiarch" \
  -DCMAKE_HIP_FLAGS="--rocm-path=/usr --rocm-device-lib-path=$multiarch/amdgcn/bitcode" >/dev/null
"$tools/bin/cmake" --build "$dir/build" --target tokenmill_hip
echo "HIP kernels compiled for gfx90a"
