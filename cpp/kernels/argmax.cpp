// Row-wise argmax for greedy sampling: a vocabulary-sized row is read twice
// (its maximum, then the first index holding it), both passes vectorised,
// rows in parallel.
#include <limits>
#include <type_traits>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2.h"
#endif

namespace tokenmill::cpu {
namespace {

constexpr int64_t kChunk = 64;

template <typename T>
__attribute__((always_inline)) inline int64_t argmax_row(const T* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    best = v > best ? v : best;
    nan |= v != v;
  }
  // The first chunk that holds the target, then the first index within it.
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t end = c + kChunk < n ? c + kChunk : n;
    bool found = false;
#pragma omp simd reduction(| : found)
    for (int64_t i = c; i < end; ++i) {
      const float v = to_float(x[i]);
      found |= nan ? v != v : v == best;
    }
    if (!found) continue;
    for (int64_t i = c; i < end; ++i) {
      const float v = to_float(x[i]);
      if (nan ? v != v : v == best) return i;
    }
  }
  return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
// Eight lanes at a time: the maximum and whether a NaN occurs, then the first
// lane equal to the target (the maximum, or a NaN).
template <typename T>
__attribute__((target("avx2,fma"))) int64_t argmax_row_avx2(const T* x, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = load8(x + i);
    best = _mm256_max_ps(best, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float top = hmax(best);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = n8; i < n; ++i) {
    const float v = to_float(x[i]);
    top = v > top ? v : top;
    has_nan |= v != v;
  }
  const __m256 target = _mm256_set1_ps(top);
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = load8(x + i);
    const int hit = _mm256_movemask_ps(has_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                               : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = n8; i < n; ++i) {
    const float v = to_float(x[i]);
    if (has_nan ? v != v : v == top) return i;
  }
  return 0;
}
#endif

template <typename T>
int64_t argmax_any(const T* x, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (!std::is_same_v<T, f16>)
    if (cpu_has_avx2_fma()) return argmax_row_avx2(x, n);
#endif
  return argmax_row(x, n);
}

TM_MULTIVERSION void argmax_range(DType dtype, int64_t* out, const void* x, int64_t r0, int64_t r1,
                                  int64_t n, int64_t stride) {
  for (int64_t r = r0; r < r1; ++r) {
    if (dtype == DType::kFloat32)
      out[r] = argmax_any(static_cast<const float*>(x) + r * stride, n);
    else if (dtype == DType::kBFloat16)
      out[r] = argmax_any(static_cast<const bf16*>(x) + r * stride, n);
#if defined(__FLT16_MAX__)
    else
      out[r] = argmax_row(static_cast<const f16*>(x) + r * stride, n);
#endif
  }
}

}  // namespace

void argmax_rows(DType dtype, int64_t* out, const void* x, int64_t m, int64_t n, int64_t stride) {
  if (m == 1) return argmax_range(dtype, out, x, 0, 1, n, stride);
  for_thread_ranges(
      m, [&](int64_t r0, int64_t r1) { argmax_range(dtype, out, x, r0, r1, n, stride); });
}

}  // namespace tokenmill::cpu
