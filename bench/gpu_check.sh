#!/usr/bin/env bash
# GPU check on a fresh NVIDIA machine (H100/H200, no internet; Python, torch
# with CUDA, cmake, ninja, pybind11, scikit-build-core and transformers are
# present, fastapi and uvicorn may not be). Builds the CUDA extension for the
# GPU present, runs the GPU tests against float64 and transformers
# references, then the kernel and end-to-end benchmarks. Every log goes under
# OUT (argument or $OUT); summary.txt collects the headline figures.
#   bash bench/gpu_check.sh [OUT]
# WORKLOAD (default ../shared/bench/workload_main.json) is the throughput
# workload; without it a synthetic one of the same shape runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { echo "== $1 ($(($(date +%s) - start)) s)" | tee -a "$out/summary.txt"; }

step "device"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability())"
} 2>&1 | tee "$out/device.txt" | tee -a "$out/summary.txt"

arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}a' if m >= 9 else f'{m}{n}')")
step "build for sm_$arch"
python3 -m pip install --no-build-isolation --no-deps -q -e . -C build-dir=build/gpu \
  -C cmake.define.TOKENMILL_CUDA=ON -C cmake.define.TOKENMILL_CUDA_ARCHS="$arch" \
  > "$out/build.txt" 2>&1 || { echo "build failed"; tail -50 "$out/build.txt"; exit 1; }
python3 -c "from tokenmill.devices import cuda_archs, cuda_kernels_available as ok; print('archs', cuda_archs(), 'usable', ok())" \
  2>&1 | tee -a "$out/build.txt" | tee -a "$out/summary.txt"

step "GPU tests: every op against float64, int4, CUDA graphs, generation vs CPU"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_kernels.py tests/test_quantization.py tests/test_gpu_runner.py > "$out/tests.txt" 2>&1
tail -3 "$out/tests.txt" | tee -a "$out/summary.txt"

step "end to end on the GPU against transformers"
timeout 240 python3 -m bench.gpu_e2e "$out/model_path.txt" > "$out/e2e.txt" 2>&1
grep -E "identical|skipped|Error" "$out/e2e.txt" | tee -a "$out/summary.txt"

step "kernel benchmarks"
timeout 200 python3 -m bench.kernel_ops --device cuda --dtype bfloat16 > "$out/bench_kernels.txt" 2>&1
grep -E "bandwidth|attention" "$out/bench_kernels.txt" | tee -a "$out/summary.txt"
timeout 120 python3 -m bench.quant --device cuda --kernels-only > "$out/bench_int4.txt" 2>&1
head -12 "$out/bench_int4.txt" >> "$out/summary.txt"

step "offline throughput beside transformers"
workload=${WORKLOAD:-../shared/bench/workload_main.json}
if [ -f "$workload" ]; then wl=(--workload "$workload"); else wl=(--synthetic 256,274,128); fi
timeout 300 python3 -m bench.throughput "${wl[@]}" --device cuda --dtype bfloat16 \
  --model "${MODEL:-$(cat "$out/model_path.txt")}" --hf-requests 64 --hf-batch-size 64 > "$out/bench_throughput.txt" 2>&1
tail -6 "$out/bench_throughput.txt" | tee -a "$out/summary.txt"
step "done; logs in $out"
