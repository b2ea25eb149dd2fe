#!/usr/bin/env bash
# GPU check on a fresh NVIDIA machine (H100/H200, no internet; Python, torch
# with CUDA, cmake, ninja, pybind11, scikit-build-core and transformers
# present). Builds the CUDA extension, runs the GPU tests and kernel
# benchmarks, and writes every log under OUT (argument or $OUT).
#   bash bench/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
  echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability())"
} 2>&1 | tee "$out/device.txt"

arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}a' if m >= 9 else f'{m}{n}')")
echo "== build for sm_$arch" | tee "$out/build.txt"
time (TOKENMILL_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -e . \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -C build-dir=build/gpu) >> "$out/build.txt" 2>&1 || {
  echo "build failed"; tail -50 "$out/build.txt"; exit 1; }
python3 -c "from tokenmill.devices import cuda_archs, cuda_kernels_available as ok; print('archs', cuda_archs(), 'usable', ok())" \
  2>&1 | tee -a "$out/build.txt"

echo "== GPU kernel tests (float64 references)"
timeout 240 python3 -m pytest -q -x tests/test_kernels.py -k "cuda" 2>&1 | tail -30 | tee "$out/tests.txt"

echo "== end to end on the GPU against transformers"
timeout 180 python3 - <<'PY' 2>&1 | tee "$out/e2e.txt"
import torch, sys
sys.path.insert(0, "tests")
from conftest import build_model, hf_model
import tempfile
from tokenmill import LLM, SamplingParams
with tempfile.TemporaryDirectory() as d:
    path = build_model("llama", d)
    llm = LLM(path, device="cuda", dtype="float32", kv_cache_memory="256MiB")
    prompts = [[5, 6, 7, 8], list(range(10, 50))]
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=16, min_tokens=16), use_tqdm=False)
    ref = hf_model(path).cuda()
    for p, o in zip(prompts, ours):
        r = ref.generate(torch.tensor([p]).cuda(), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=1)[0, len(p):].tolist()
        print("tiny llama greedy identical:", o.outputs[0].token_ids == r)
PY

echo "== kernel benchmark (bandwidth of decode attention vs a large copy)"
timeout 120 python3 - <<'PY' 2>&1 | tee "$out/bench_kernels.txt"
import torch, time
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): b.copy_(a)
torch.cuda.synchronize(); print(f"copy bandwidth {2 * a.numel() * 20 / (time.perf_counter() - t) / 1e9:.0f} GB/s")
import tokenmill.ops
kv = torch.randn(4096, 8, 16, 128, dtype=torch.bfloat16, device="cuda"); vv = torch.randn_like(kv)
k = torch.randn(8192, 8 * 128, dtype=torch.bfloat16, device="cuda"); v = torch.randn_like(k)
slots = torch.randperm(4096 * 16, device="cuda")[:8192].int()
for _ in range(3): torch.ops.tokenmill.reshape_and_cache(k, v, kv, vv, slots)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(100): torch.ops.tokenmill.reshape_and_cache(k, v, kv, vv, slots)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 100
print(f"reshape_and_cache 8192 tokens: {dt * 1e6:.1f} us, {4 * k.numel() * 2 / dt / 1e9:.0f} GB/s")
PY
echo "logs in $out"
