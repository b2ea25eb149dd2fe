// Gated activations: out[t, i] = act(x[t, i]) * x[t, d + i]. A 2-D grid of
// rows by column tiles.
#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float activate(Activation act, float x) {
  switch (act) {
    case Activation::kSilu:
      return x / (1.f + __expf(-x));
    case Activation::kGeluExact:
      return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    default: {
      const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(u));
    }
  }
}

template <typename T>
__global__ void act_and_mul_kernel(Activation act, T* __restrict__ out, const T* __restrict__ x,
                                   int64_t d, int64_t x_stride, int64_t out_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  const T* xr = x + blockIdx.x * x_stride;
  out[blockIdx.x * out_stride + i] =
      from_float<T>(activate(act, to_float(xr[i])) * to_float(xr[d + i]));
}

}  // namespace

const char* act_and_mul(DType dtype, Activation act, void* out, const void* x, int64_t rows,
                        int64_t d, int64_t x_stride, int64_t out_stride, void* stream) {
  if (rows == 0 || d == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>((d + kThreads - 1) / kThreads));
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TM_LAUNCH(grid, kThreads, stream, act_and_mul_kernel<T>)
    (act, static_cast<T*>(out), static_cast<const T*>(x), d, x_stride, out_stride);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
