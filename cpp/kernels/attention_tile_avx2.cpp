// Register-blocked inner products of prefill attention tiles: scores from
// keys transposed once per block, so each key vector feeds six query rows,
// and weighted values with two rows' accumulators held in registers across
// the block, instead of a horizontal sum per score and a load and store of
// the accumulator per value row.
#include "attention_tile.h"
#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2.h"
#endif

namespace tokenmill::cpu {
namespace {

void scores_portable(const float* q, int rows, int D, const float* k, int n, float* s,
                     int s_stride) {
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < n; ++t) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int d = 0; d < D; ++d) sum += q[r * D + d] * k[t * D + d];
      s[r * s_stride + t] = sum;
    }
}

void values_portable(const float* s, int s_stride, int rows, const float* v, int n, int D,
                     float* acc) {
  for (int t = 0; t < n; ++t)
    for (int r = 0; r < rows; ++r) {
      const float p = s[r * s_stride + t];
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[r * D + d] += p * v[t * D + d];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
// R rows against eight keys: kt holds the keys transposed, kt[d * n8 + t].
template <int R>
TM_AVX2 void scores_rows(const float* q, int D, const float* kt, int n8, int t0, float* s,
                         int s_stride) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const __m256 kv = _mm256_loadu_ps(kt + d * n8 + t0);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + r * D + d), kv, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(s + r * s_stride + t0, acc[r]);
}

__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, int rows, int D,
                                                     const float* k, int n, float* s, int s_stride,
                                                     float* kt) {
  const int n8 = (n + 7) / 8 * 8;  // padded keys score zero, in columns past n
  for (int d = 0; d < D; ++d)
    for (int t = 0; t < n8; ++t) kt[d * n8 + t] = t < n ? k[t * D + d] : 0.f;
  for (int t0 = 0; t0 < n8; t0 += 8) {
    int r = 0;
    for (; r + 6 <= rows; r += 6)
      scores_rows<6>(q + r * D, D, kt, n8, t0, s + r * s_stride, s_stride);
    for (; r < rows; ++r) scores_rows<1>(q + r * D, D, kt, n8, t0, s + r * s_stride, s_stride);
  }
}

// R rows, 32 head dims from d0, over all n value rows.
template <int R>
TM_AVX2 void values_rows(const float* s, int s_stride, const float* v, int n, int D, int d0,
                         float* acc) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = _mm256_loadu_ps(acc + r * D + d0 + 8 * c);
  for (int t = 0; t < n; ++t) {
    __m256 vv[4];
    for (int c = 0; c < 4; ++c) vv[c] = _mm256_loadu_ps(v + t * D + d0 + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 p = _mm256_broadcast_ss(s + r * s_stride + t);
      for (int c = 0; c < 4; ++c) a[r][c] = _mm256_fmadd_ps(p, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + r * D + d0 + 8 * c, a[r][c]);
}

__attribute__((target("avx2,fma"))) void values_avx2(const float* s, int s_stride, int rows,
                                                     const float* v, int n, int D, float* acc) {
  for (int d0 = 0; d0 < D; d0 += 32) {
    int r = 0;
    for (; r + 2 <= rows; r += 2)
      values_rows<2>(s + r * s_stride, s_stride, v, n, D, d0, acc + r * D);
    for (; r < rows; ++r) values_rows<1>(s + r * s_stride, s_stride, v, n, D, d0, acc + r * D);
  }
}
#endif

}  // namespace

void tile_scores(const float* q, int rows, int D, const float* k, int n, float* s, int s_stride,
                 float* kt) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma() && D % 8 == 0 && s_stride % 8 == 0 && n <= s_stride)
    return scores_avx2(q, rows, D, k, n, s, s_stride, kt);
#endif
  (void)kt;
  scores_portable(q, rows, D, k, n, s, s_stride);
}

void tile_values(const float* s, int s_stride, int rows, const float* v, int n, int D, float* acc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma() && D % 32 == 0) return values_avx2(s, s_stride, rows, v, n, D, acc);
#endif
  values_portable(s, s_stride, rows, v, n, D, acc);
}

}  // namespace tokenmill::cpu
