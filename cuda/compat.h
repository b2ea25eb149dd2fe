// One spelling of the runtime API, the kernel launch and the 16-bit float
// types for the CUDA and HIP builds of the same kernel sources, and for their
// emulation on the host (emulation/runtime.h) that tests run without a GPU.
#pragma once

#if defined(TOKENMILL_GPU_EMULATION)
#include "emulation/runtime.h"
using tmStream_t = void*;
using tmError_t = int;
constexpr tmError_t tmSuccess = 0;
inline tmError_t tmGetLastError() { return tmSuccess; }
inline const char* tmGetErrorString(tmError_t) { return "no error"; }
using tm_bfloat16 = __nv_bfloat16;
inline float tm_bf16_to_float(tm_bfloat16 x) { return __bfloat162float(x); }
inline tm_bfloat16 tm_float_to_bf16(float x) { return __float2bfloat16_rn(x); }
constexpr int kWarpSize = ::tokenmill::gpu::emulation::kWarpSize;
#define TM_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, v, m)
#define TM_LAUNCH(grid, block, stream, ...) \
  ::tokenmill::gpu::emulation::launch(grid, block, __VA_ARGS__)
#define TM_HAS_WMMA 1
#elif defined(__HIP__) || defined(__HIP_PLATFORM_AMD__) || defined(USE_ROCM)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define tmStream_t hipStream_t
#define tmError_t hipError_t
#define tmSuccess hipSuccess
#define tmGetLastError hipGetLastError
#define tmGetErrorString hipGetErrorString
#if __has_include(<hip/hip_bf16.h>)  // ROCm 6
#include <hip/hip_bf16.h>
using tm_bfloat16 = __hip_bfloat16;
__device__ __forceinline__ float tm_bf16_to_float(tm_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ tm_bfloat16 tm_float_to_bf16(float x) { return __float2bfloat16(x); }
#else  // ROCm 5: a struct that rounds to nearest even on construction
#include <hip/hip_bfloat16.h>
using tm_bfloat16 = hip_bfloat16;
__device__ __forceinline__ float tm_bf16_to_float(tm_bfloat16 x) { return static_cast<float>(x); }
__device__ __forceinline__ tm_bfloat16 tm_float_to_bf16(float x) { return tm_bfloat16(x); }
#endif
constexpr int kWarpSize = 64;
#define TM_SHFL_XOR(v, m) __shfl_xor(v, m)
#define TM_LAUNCH(grid, block, stream, ...) \
  __VA_ARGS__<<<grid, block, 0, static_cast<tmStream_t>(stream)>>>
#define TM_HAS_WMMA 0  // rocWMMA differs; ROCm runs the per-token attention kernel
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define tmStream_t cudaStream_t
#define tmError_t cudaError_t
#define tmSuccess cudaSuccess
#define tmGetLastError cudaGetLastError
#define tmGetErrorString cudaGetErrorString
using tm_bfloat16 = __nv_bfloat16;
__device__ __forceinline__ float tm_bf16_to_float(tm_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ tm_bfloat16 tm_float_to_bf16(float x) { return __float2bfloat16_rn(x); }
constexpr int kWarpSize = 32;
#define TM_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, v, m)
#define TM_LAUNCH(grid, block, stream, ...) \
  __VA_ARGS__<<<grid, block, 0, static_cast<tmStream_t>(stream)>>>
#define TM_HAS_WMMA 1
#endif
