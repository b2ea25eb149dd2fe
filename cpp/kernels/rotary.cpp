// Rotary position embedding in place on query and key, NeoX (halves) or
// GPT-J (interleaved pairs) layout, with a float32 cos/sin table.
#include "common.h"

namespace tokenmill::cpu {
namespace {

template <typename T>
__attribute__((always_inline)) inline void rotate_head(T* x, const float* cos, const float* sin,
                                                       int rot_dim, bool neox) {
  const int half = rot_dim / 2;
  for (int i = 0; i < half; ++i) {
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + half : 2 * i + 1;
    const float x1 = to_float(x[a]), x2 = to_float(x[b]);
    x[a] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    x[b] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
__attribute__((always_inline)) inline void rotate_token(const float* cs, View3 q, int num_heads,
                                                        View3 k, int num_kv_heads, int64_t t,
                                                        int rot_dim, bool neox) {
  const float* cos = cs;
  const float* sin = cs + rot_dim / 2;
  T* qt = static_cast<T*>(q.data) + t * q.row_stride;
  for (int h = 0; h < num_heads; ++h) rotate_head(qt + h * q.head_stride, cos, sin, rot_dim, neox);
  if (!k.data) return;
  T* kt = static_cast<T*>(k.data) + t * k.row_stride;
  for (int h = 0; h < num_kv_heads; ++h)
    rotate_head(kt + h * k.head_stride, cos, sin, rot_dim, neox);
}

TM_MULTIVERSION void rotate_tokens(DType dtype, const int32_t* positions, int64_t t0, int64_t t1,
                                   View3 q, int nh, View3 k, int nkv, const float* cache,
                                   int rot_dim, bool neox) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* cs = cache + static_cast<int64_t>(positions[t]) * rot_dim;
    switch (dtype) {
      case DType::kFloat32:
        rotate_token<float>(cs, q, nh, k, nkv, t, rot_dim, neox);
        break;
      case DType::kBFloat16:
        rotate_token<bf16>(cs, q, nh, k, nkv, t, rot_dim, neox);
        break;
#if defined(__FLT16_MAX__)
      case DType::kFloat16:
        rotate_token<f16>(cs, q, nh, k, nkv, t, rot_dim, neox);
        break;
#endif
      default:
        break;
    }
  }
}

}  // namespace

void rotary_embedding(DType dtype, const int32_t* positions, int64_t num_tokens, View3 query,
                      int num_heads, View3 key, int num_kv_heads, int head_size,
                      const float* cos_sin_cache, int rot_dim, bool is_neox) {
  dispatch_dtype(dtype, [](auto) {});
  if (rot_dim > head_size || rot_dim % 2)
    throw std::invalid_argument("rot_dim must be even and at most head_size");
#pragma omp parallel for if (num_tokens > 16)
  for (int64_t t = 0; t < num_tokens; ++t)
    rotate_tokens(dtype, positions, t, t + 1, query, num_heads, key, num_kv_heads, cos_sin_cache,
                  rot_dim, is_neox);
}

}  // namespace tokenmill::cpu
