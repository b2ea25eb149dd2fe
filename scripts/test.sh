#!/usr/bin/env bash
# Runs every test: the C++ unit tests (plain, then under ASan+UBSan), the
# find_package example, the ROCm compile check, the CPU wheel in a fresh
# virtualenv, and pytest. (The CUDA kernels compile with the package itself
# wherever nvcc is installed.)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=${TOKENMILL_TEST_BUILD:-$root/build/ctest}
jobs=$(nproc)

cxx_tests() {  # $1: build dir, $2...: extra cmake args
  local dir=$1; shift
  cmake -S "$root" -B "$dir" -G Ninja -DTOKENMILL_BUILD_TESTS=ON -DTOKENMILL_CUDA=OFF "$@" >/dev/null
  cmake --build "$dir" -j "$jobs" >/dev/null
  ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

echo "== C++ unit tests"
cxx_tests "$work/plain"
echo "== C++ unit tests under AddressSanitizer + UndefinedBehaviorSanitizer"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1 cxx_tests "$work/asan" -DTOKENMILL_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug

echo "== C++ example through find_package(tokenmill)"
cmake --install "$work/plain" --prefix "$work/prefix" >/dev/null
cmake -S cpp/examples -B "$work/example" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/example" >/dev/null
"$work/example/schedule_demo" | tail -n 2

echo "== HIP compile check"
bash scripts/check_hip.sh "$work/hip"

echo "== CPU wheel in a fresh virtualenv"
bash scripts/wheel_smoke.sh "$work/wheel"

echo "== pytest"
python3 -m pytest -q "$@"
