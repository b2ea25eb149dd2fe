// Dense GEMV for a few input rows with AVX2 + FMA intrinsics: the decode
// case, bound by reading the weight. A thread reads its weight rows as long
// runs side by side (common.h: for_row_runs), and takes the input rows in
// chunks of up to four against each tile of weight rows, which stays in L1
// after the first chunk.
#include <algorithm>

#include "linear_gemv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2.h"

namespace tokenmill::cpu {
namespace {

constexpr int kBlock = 16;  // bfloat16 weights are read 16 at a time

// R bfloat16 weight rows (j, j + stride, ...) against M input rows. A 32-byte load holds 16
// weights; a shift widens the even ones to float and a mask the odd ones, so
// x is laid out to match (dense_gemv_order_x). One input row keeps the even
// and odd products apart for shorter FMA chains; more share an accumulator.
// The weights are widened before the input rows are read, which then come
// from L1 as FMA operands: four input rows against two weight rows keep all
// eight accumulators in registers.
template <int M, int R>
__attribute__((target("avx2,fma"))) void gemv_bf16(const DenseGemv& a, int64_t j, int64_t stride,
                                                   int64_t i0) {
  constexpr int S = M == 1 ? 2 : 1;
  const bf16* w = static_cast<const bf16*>(a.weight) + j * a.k;
  const float* x = a.x + i0 * a.k;
  float* out = a.out + i0 * a.n;
  const int64_t ws = stride * a.k;
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[R][M][S];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      for (int s = 0; s < S; ++s) acc[r][i][s] = _mm256_setzero_ps();
  const int64_t kb = a.k / kBlock * kBlock;
  for (int64_t kk = 0; kk < kb; kk += kBlock) {
    __m256 we[R], wo[R];
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ws + kk));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
    }
    for (int i = 0; i < M; ++i) {
      const __m256 xe = _mm256_loadu_ps(x + i * a.k + kk);
      const __m256 xo = _mm256_loadu_ps(x + i * a.k + kk + 8);
      for (int r = 0; r < R; ++r) {
        acc[r][i][0] = _mm256_fmadd_ps(we[r], xe, acc[r][i][0]);
        acc[r][i][S - 1] = _mm256_fmadd_ps(wo[r], xo, acc[r][i][S - 1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      float total = hsum(S == 2 ? _mm256_add_ps(acc[r][i][0], acc[r][i][S - 1]) : acc[r][i][0]);
      for (int64_t kk = kb; kk < a.k; ++kk) total += to_float(w[r * ws + kk]) * x[i * a.k + kk];
      out[i * a.n + j + r * stride] = total;
    }
}

// R float32 weight rows (j, j + stride, ...) against M input rows.
template <int M, int R>
__attribute__((target("avx2,fma"))) void gemv_f32(const DenseGemv& a, int64_t j, int64_t stride,
                                                  int64_t i0) {
  const float* w = static_cast<const float*>(a.weight) + j * a.k;
  const float* x = a.x + i0 * a.k;
  float* out = a.out + i0 * a.n;
  const int64_t ws = stride * a.k;
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t k8 = a.k / 8 * 8;
  for (int64_t kk = 0; kk < k8; kk += 8) {
    __m256 xv[M];
    for (int i = 0; i < M; ++i) xv[i] = _mm256_loadu_ps(x + i * a.k + kk);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * ws + kk);
      for (int i = 0; i < M; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      float total = hsum(acc[r][i]);
      for (int64_t kk = k8; kk < a.k; ++kk) total += w[r * ws + kk] * x[i * a.k + kk];
      out[i * a.n + j + r * stride] = total;
    }
}

// Four runs for one or two input rows; two for more, whose accumulators
// take the registers.
template <int R>
void gemv_rows(const DenseGemv& a, int64_t n0, int64_t n1) {
  const bool bf = a.w_dtype == DType::kBFloat16;
  for_row_runs<R>(n0, n1, [&](auto runs, int64_t j, int64_t stride) {
    constexpr int tile = decltype(runs)::value;
    for_input_chunks<tile>(a.m, [&](auto rows, int64_t i) {
      constexpr int chunk = decltype(rows)::value;
      bf ? gemv_bf16<chunk, tile>(a, j, stride, i) : gemv_f32<chunk, tile>(a, j, stride, i);
    });
  });
}

}  // namespace

bool dense_gemv_supported(int64_t m, int64_t k, DType w_dtype) {
  return cpu_has_avx2_fma() && m >= 1 && k >= 16 &&
         (w_dtype == DType::kFloat32 || w_dtype == DType::kBFloat16);
}

void dense_gemv_order_x(float* x, int64_t m, int64_t k, DType w_dtype) {
  if (w_dtype != DType::kBFloat16) return;
  float block[kBlock];
  for (int64_t i = 0; i < m; ++i)
    for (int64_t kk = 0; kk + kBlock <= k; kk += kBlock) {
      float* p = x + i * k + kk;
      for (int e = 0; e < kBlock / 2; ++e) {
        block[e] = p[2 * e];
        block[kBlock / 2 + e] = p[2 * e + 1];
      }
      std::copy(block, block + kBlock, p);
    }
}

void dense_gemv(const DenseGemv& a, int64_t n0, int64_t n1) {
  if (a.m <= 2)
    gemv_rows<4>(a, n0, n1);
  else
    gemv_rows<2>(a, n0, n1);
}

}  // namespace tokenmill::cpu

#else
namespace tokenmill::cpu {
bool dense_gemv_supported(int64_t, int64_t, DType) { return false; }
void dense_gemv_order_x(float*, int64_t, int64_t, DType) {}
void dense_gemv(const DenseGemv&, int64_t, int64_t) {}
}  // namespace tokenmill::cpu
#endif
