// Helpers shared by the GPU kernels: float conversion of the storage types,
// warp and block reductions, and dispatch from DType to a storage type.
#pragma once

#include "compat.h"
#include "tokenmill/kernel_params.h"

namespace tokenmill::gpu {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(tm_bfloat16 x) { return tm_bf16_to_float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ tm_bfloat16 from_float<tm_bfloat16>(float x) {
  return tm_float_to_bf16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += TM_SHFL_XOR(v, m);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float
// per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// Calls f(T{}) with T the storage type of dtype.
template <class F>
const char* dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kBFloat16:
      f(tm_bfloat16{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    default:
      return "unsupported dtype";
  }
  return nullptr;
}

// Whether the current device runs 16-bit WMMA of both types (sm_80 and newer).
inline bool device_has_tensor_cores() {
#if defined(TOKENMILL_GPU_EMULATION)
  return true;
#elif TM_HAS_WMMA
  static int major[64] = {};  // per device; 0 until asked
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (major[device] == 0)
    cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device);
  return major[device] >= 8;
#else
  return false;
#endif
}

inline const char* last_error() {
  tmError_t err = tmGetLastError();
  return err == tmSuccess ? nullptr : tmGetErrorString(err);
}

}  // namespace tokenmill::gpu
