// Gated activations: out = act(x[:, :d]) * x[:, d:].
#include <type_traits>

#include "avx2.h"
#include "avx512.h"
#include "common.h"

namespace tokenmill::cpu {
namespace {

__attribute__((always_inline)) inline float activate(Activation a, float x) {
  switch (a) {
    case Activation::kSilu:
      return x / (1.f + fast_exp(-x));
    case Activation::kGeluExact:
      return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    default: {
      // 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u))
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return x / (1.f + fast_exp(-2.f * inner));
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// SiLU(gate) * up, eight lanes at a time; returns how many columns it did.
template <typename T>
__attribute__((target("avx2,fma"))) int64_t silu_row_avx2(T* out, const T* x, int64_t d) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 g = load8(x + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    store8(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), load8(x + d + i)));
  }
  return i;
}

// The same, sixteen lanes at a time, with the reciprocal of 1 + exp(-g) from
// its 14-bit estimate and one Newton step (relative error ~1e-7) rather than
// a division, which on these CPUs bounds the loop.
template <typename T>
__attribute__((target(TM_AVX512_TARGET))) int64_t silu_row_avx512(T* out, const T* x, int64_t d) {
  const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512 g = load16(x + i);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 r = _mm512_rcp14_ps(den);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, two));
    store16(out + i, _mm512_mul_ps(_mm512_mul_ps(g, r), load16(x + d + i)));
  }
  return i;
}
#endif

template <typename T>
__attribute__((always_inline)) inline void act_row(Activation a, T* out, const T* x, int64_t d) {
  if (a == Activation::kSilu) {
    int64_t start = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (!std::is_same_v<T, f16>) {
      if (cpu_has_avx512_bf16())
        start = silu_row_avx512(out, x, d);
      else if (cpu_has_avx2_fma())
        start = silu_row_avx2(out, x, d);
    }
#endif
#pragma omp simd
    for (int64_t i = start; i < d; ++i) {
      const float g = to_float(x[i]);
      out[i] = from_float<T>(g / (1.f + fast_exp(-g)) * to_float(x[d + i]));
    }
    return;
  }
  for (int64_t i = 0; i < d; ++i)
    out[i] = from_float<T>(activate(a, to_float(x[i])) * to_float(x[d + i]));
}

TM_MULTIVERSION void act_rows(DType dtype, Activation a, void* out, const void* x, int64_t r0,
                              int64_t r1, int64_t d, int64_t xs, int64_t os) {
  for (int64_t r = r0; r < r1; ++r) {
    switch (dtype) {
      case DType::kFloat32:
        act_row(a, static_cast<float*>(out) + r * os, static_cast<const float*>(x) + r * xs, d);
        break;
      case DType::kBFloat16:
        act_row(a, static_cast<bf16*>(out) + r * os, static_cast<const bf16*>(x) + r * xs, d);
        break;
#if defined(__FLT16_MAX__)
      case DType::kFloat16:
        act_row(a, static_cast<f16*>(out) + r * os, static_cast<const f16*>(x) + r * xs, d);
        break;
#endif
      default:
        break;
    }
  }
}

}  // namespace

void act_and_mul(DType dtype, Activation act, void* out, const void* x, int64_t rows, int64_t d,
                 int64_t x_stride, int64_t out_stride) {
  dispatch_dtype(dtype, [](auto) {});
#pragma omp parallel for if (rows * d > 16384)
  for (int64_t r = 0; r < rows; ++r)
    act_rows(dtype, act, out, x, r, r + 1, d, x_stride, out_stride);
}

}  // namespace tokenmill::cpu
