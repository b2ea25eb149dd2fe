// The greedy token without the full logits. A decode step of a small model
// spends a fifth of its weight reads on the LM head (SmolLM2: 56.6 of 269 MB
// in bfloat16), yet greedy decoding needs only the argmax. Stage one scores
// every row from an int8 copy of the head (half the bytes) and bounds each
// score's error; only rows whose upper bound reaches the best lower bound
// can win, and stage two scores those few exactly as linear() does, so the
// token is the one the full logits would give, ties included.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "linear_gemv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2.h"
#endif

namespace tokenmill::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// scales[r] * (x . q[r]) for R int8 rows (j, j + stride, ...).
template <int R>
__attribute__((target("avx2,fma"))) void int8_rows(const int8_t* q, const float* scales,
                                                   const float* x, int64_t k, int64_t j,
                                                   int64_t stride, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t k8 = k / 8 * 8;
  for (int64_t kk = 0; kk < k8; kk += 8) {
    const __m256 xv = _mm256_loadu_ps(x + kk);
    for (int r = 0; r < R; ++r) {
      const __m128i b =
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (j + r * stride) * k + kk));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float total = hsum(acc[r]);
    const int8_t* row = q + (j + r * stride) * k;
    for (int64_t kk = k8; kk < k; ++kk) total += row[kk] * x[kk];
    out[j + r * stride] = scales[j + r * stride] * total;
  }
}

void int8_scores(const int8_t* q, const float* scales, const float* x, int64_t k, int64_t n0,
                 int64_t n1, float* out) {
  for_row_runs<4>(n0, n1, [&](auto runs, int64_t j, int64_t stride) {
    int8_rows<decltype(runs)::value>(q, scales, x, k, j, stride, out);
  });
}
#else
void int8_scores(const int8_t*, const float*, const float*, int64_t, int64_t, int64_t, float*) {}
#endif

}  // namespace

int64_t greedy_head(DType x_dtype, DType w_dtype, const void* x, const void* weight,
                    const int8_t* q, const float* scales, const float* bounds, int64_t k,
                    int64_t v) {
  if (!dense_gemv_supported(1, k, w_dtype) || v <= 0) return -1;
  std::vector<float> xf(k);
  rows_to_float(x_dtype, xf.data(), x, 1, k, k, k);
  double norm2 = 0;
  for (float e : xf) norm2 += static_cast<double>(e) * e;
  const float norm = static_cast<float>(std::sqrt(norm2));
  if (!std::isfinite(norm)) return -1;

  // Stage one: approximate scores, and the best lower bound among them.
  // Kept between calls: a fresh vocabulary-sized buffer faults in its pages.
  thread_local std::vector<float> scores;
  if (scores.size() < static_cast<size_t>(v)) scores.resize(v);
  float* approx = scores.data();
  float lower = -std::numeric_limits<float>::infinity();
  for_thread_ranges(v, [&](int64_t n0, int64_t n1) {
    int8_scores(q, scales, xf.data(), k, n0, n1, approx);
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t r = n0; r < n1; ++r) best = std::max(best, approx[r] - bounds[r] * norm);
#pragma omp critical
    lower = std::max(lower, best);
  });
  // Two units in the last place of a bfloat16 at the winner's magnitude: a
  // row this close to the best exact score may round to the same value.
  const float threshold = lower - (std::fabs(lower) * 0x1p-6f + 1e-30f);

  // Stage two: the rows that may win, scored as linear() scores them.
  std::vector<float> xo(xf);
  dense_gemv_order_x(xo.data(), 1, k, w_dtype);
  float exact;
  const DenseGemv row{&exact, xo.data(), weight, w_dtype, 1, k, 1};
  int64_t best = -1;
  float best_value = -std::numeric_limits<float>::infinity();
  const size_t w_size = w_dtype == DType::kBFloat16 ? 2 : 4;
  for (int64_t r = 0; r < v; ++r) {
    if (approx[r] + bounds[r] * norm < threshold) continue;
    DenseGemv a = row;
    a.weight = static_cast<const char*>(weight) + r * k * w_size;
    dense_gemv(a, 0, 1);
    float value = exact;
    dispatch_dtype(x_dtype, [&](auto tag) { value = to_float(from_float<decltype(tag)>(exact)); });
    if (best < 0 || value > best_value) best = r, best_value = value;
  }
  return best;
}

}  // namespace tokenmill::cpu
