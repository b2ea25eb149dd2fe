// One spelling of the runtime API and the 16-bit float types for the CUDA
// and HIP builds of the same kernel sources.
#pragma once

#if defined(__HIP__) || defined(__HIP_PLATFORM_AMD__) || defined(USE_ROCM)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define tmStream_t hipStream_t
#define tmError_t hipError_t
#define tmSuccess hipSuccess
#define tmGetLastError hipGetLastError
#define tmGetErrorString hipGetErrorString
#define tmFuncSetAttribute hipFuncSetAttribute
#define tmFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
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
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define tmStream_t cudaStream_t
#define tmError_t cudaError_t
#define tmSuccess cudaSuccess
#define tmGetLastError cudaGetLastError
#define tmGetErrorString cudaGetErrorString
#define tmFuncSetAttribute cudaFuncSetAttribute
#define tmFuncAttributeMaxDynamicSharedMemorySize cudaFuncAttributeMaxDynamicSharedMemorySize
using tm_bfloat16 = __nv_bfloat16;
__device__ __forceinline__ float tm_bf16_to_float(tm_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ tm_bfloat16 tm_float_to_bf16(float x) { return __float2bfloat16_rn(x); }
constexpr int kWarpSize = 32;
#define TM_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, v, m)
#endif
