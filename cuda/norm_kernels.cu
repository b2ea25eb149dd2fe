// RMSNorm, plain and fused with the residual add: one thread block per row,
// float32 accumulation.
#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ void normalize_row(T* out, const T* src, const T* __restrict__ w, int64_t dim,
                              float eps) {
  __shared__ float scratch[kThreads / 32];
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = to_float(src[i]);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    out[i] = from_float<T>(to_float(src[i]) * inv * to_float(w[i]));
}

// One block per (row, head) vector.
template <typename T>
__global__ void rms_norm_kernel(View3 out, View3 x, const T* __restrict__ w, int64_t heads,
                                int64_t dim, float eps) {
  const int64_t r = blockIdx.x / heads, h = blockIdx.x % heads;
  normalize_row(static_cast<T*>(out.data) + r * out.row_stride + h * out.head_stride,
                static_cast<const T*>(x.data) + r * x.row_stride + h * x.head_stride, w, dim, eps);
}

// residual += x, rounded to T as the unfused model does; x = norm(residual).
template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual,
                                          const T* __restrict__ w, int64_t dim, int64_t x_stride,
                                          int64_t res_stride, float eps) {
  T* xr = x + blockIdx.x * x_stride;
  T* rr = residual + blockIdx.x * res_stride;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    rr[i] = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
  __syncthreads();
  normalize_row(xr, static_cast<const T*>(rr), w, dim, eps);
}

}  // namespace

const char* rms_norm(DType dtype, View3 out, View3 x, const void* weight, int64_t rows,
                     int64_t heads, int64_t dim, float eps, void* stream) {
  if (rows * heads == 0) return nullptr;
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TM_LAUNCH(rows * heads, kThreads, stream, rms_norm_kernel<T>)
    (out, x, static_cast<const T*>(weight), heads, dim, eps);
  });
  return err ? err : last_error();
}

const char* fused_add_rms_norm(DType dtype, void* x, void* residual, const void* weight,
                               int64_t rows, int64_t dim, int64_t x_stride, int64_t residual_stride,
                               float eps, void* stream) {
  if (rows == 0) return nullptr;
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TM_LAUNCH(rows, kThreads, stream, fused_add_rms_norm_kernel<T>)
    (static_cast<T*>(x), static_cast<T*>(residual), static_cast<const T*>(weight), dim, x_stride,
     residual_stride, eps);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
