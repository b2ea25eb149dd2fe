// One spelling of the runtime API for the CUDA and HIP builds.
#pragma once

#if defined(__HIP_PLATFORM_AMD__) || defined(USE_ROCM)
#include <hip/hip_runtime.h>
#define tmStream_t hipStream_t
#define tmError_t hipError_t
#define tmSuccess hipSuccess
#define tmGetLastError hipGetLastError
#define tmGetErrorString hipGetErrorString
#else
#include <cuda_runtime.h>
#define tmStream_t cudaStream_t
#define tmError_t cudaError_t
#define tmSuccess cudaSuccess
#define tmGetLastError cudaGetLastError
#define tmGetErrorString cudaGetErrorString
#endif
