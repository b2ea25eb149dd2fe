// Rotary position embedding in place on query and key: one thread block per
// token, a thread per (head, rotated pair).
#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

template <typename T>
__device__ __forceinline__ void rotate_pair(T* x, int i, const float* cs, int half, bool neox) {
  const int a = neox ? i : 2 * i;
  const int b = neox ? i + half : 2 * i + 1;
  const float c = cs[i], s = cs[half + i];
  const float x1 = to_float(x[a]), x2 = to_float(x[b]);
  x[a] = from_float<T>(x1 * c - x2 * s);
  x[b] = from_float<T>(x2 * c + x1 * s);
}

template <typename T>
__global__ void rotary_kernel(const int32_t* __restrict__ positions, View3 q, int num_heads,
                              View3 k, int num_kv_heads, const float* __restrict__ cache,
                              int rot_dim, bool neox) {
  const int64_t t = blockIdx.x;
  const float* cs = cache + static_cast<int64_t>(positions[t]) * rot_dim;
  const int half = rot_dim / 2;
  T* qt = static_cast<T*>(q.data) + t * q.row_stride;
  for (int j = threadIdx.x; j < num_heads * half; j += blockDim.x)
    rotate_pair(qt + (j / half) * q.head_stride, j % half, cs, half, neox);
  if (k.data == nullptr) return;
  T* kt = static_cast<T*>(k.data) + t * k.row_stride;
  for (int j = threadIdx.x; j < num_kv_heads * half; j += blockDim.x)
    rotate_pair(kt + (j / half) * k.head_stride, j % half, cs, half, neox);
}

}  // namespace

const char* rotary_embedding(DType dtype, const int32_t* positions, int64_t num_tokens, View3 query,
                             int num_heads, View3 key, int num_kv_heads, int head_size,
                             const float* cos_sin_cache, int rot_dim, bool is_neox, void* stream) {
  if (rot_dim > head_size || rot_dim % 2) return "rot_dim must be even and at most head_size";
  if (num_tokens == 0) return nullptr;
  const int threads = num_heads * rot_dim / 2 < 512 ? num_heads * rot_dim / 2 : 512;
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TM_LAUNCH(num_tokens, threads, stream, rotary_kernel<T>)
    (positions, query, num_heads, key, num_kv_heads, cos_sin_cache, rot_dim, is_neox);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
