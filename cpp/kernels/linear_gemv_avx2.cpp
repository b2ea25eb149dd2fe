// Dense GEMV for one or two input rows with AVX2 + FMA intrinsics: the
// decode case, bound by reading the weight. bfloat16 weights widen to float
// in registers (a 16-bit shift) and feed the FMAs directly, four weight rows
// at a time so the x loads and the FMA chains are shared.
#include "linear_gemv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "common.h"

namespace tokenmill::cpu {
namespace {

#define TM_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

TM_AVX2 __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

TM_AVX2 __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

TM_AVX2 float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// R weight rows against M input rows; with one input row each output keeps
// two accumulators so the FMA chains stay short.
template <typename TW, int R, int M>
__attribute__((target("avx2,fma"))) void gemv_tile(const DenseGemv& a, int64_t j) {
  constexpr int A = M == 1 ? 2 : 1;
  const TW* w = static_cast<const TW*>(a.weight) + j * a.k;
  __m256 acc[R][M][A];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < A; ++c) acc[r][i][c] = _mm256_setzero_ps();
  const int64_t k16 = a.k / 16 * 16;
  for (int64_t kk = 0; kk < k16; kk += 16) {
    __m256 x0[M], x1[M];
    for (int i = 0; i < M; ++i) {
      x0[i] = _mm256_loadu_ps(a.x + i * a.k + kk);
      x1[i] = _mm256_loadu_ps(a.x + i * a.k + kk + 8);
    }
    for (int r = 0; r < R; ++r) {
      // The rows of the next tile follow these ones in memory: fetch them early.
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * a.k + kk), _MM_HINT_T0);
      const __m256 w0 = load8(w + r * a.k + kk), w1 = load8(w + r * a.k + kk + 8);
      for (int i = 0; i < M; ++i) {
        acc[r][i][0] = _mm256_fmadd_ps(w0, x0[i], acc[r][i][0]);
        acc[r][i][A - 1] = _mm256_fmadd_ps(w1, x1[i], acc[r][i][A - 1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      __m256 sum = acc[r][i][0];
      if (A == 2) sum = _mm256_add_ps(sum, acc[r][i][1]);
      float total = hsum(sum);
      for (int64_t kk = k16; kk < a.k; ++kk) total += to_float(w[r * a.k + kk]) * a.x[i * a.k + kk];
      a.out[i * a.n + j + r] = total;
    }
}

template <typename TW, int M>
void gemv_rows(const DenseGemv& a, int64_t n0, int64_t n1) {
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) gemv_tile<TW, 4, M>(a, j);
  for (; j < n1; ++j) gemv_tile<TW, 1, M>(a, j);
}

template <typename TW>
void gemv_typed(const DenseGemv& a, int64_t n0, int64_t n1) {
  if (a.m == 1)
    gemv_rows<TW, 1>(a, n0, n1);
  else
    gemv_rows<TW, 2>(a, n0, n1);
}

}  // namespace

bool dense_gemv_supported(int64_t m, int64_t k, DType w_dtype) {
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu_ok && m >= 1 && m <= 2 && k >= 16 &&
         (w_dtype == DType::kFloat32 || w_dtype == DType::kBFloat16);
}

void dense_gemv(const DenseGemv& a, int64_t n0, int64_t n1) {
  if (a.w_dtype == DType::kBFloat16)
    gemv_typed<bf16>(a, n0, n1);
  else
    gemv_typed<float>(a, n0, n1);
}

}  // namespace tokenmill::cpu

#else
namespace tokenmill::cpu {
bool dense_gemv_supported(int64_t, int64_t, DType) { return false; }
void dense_gemv(const DenseGemv&, int64_t, int64_t) {}
}  // namespace tokenmill::cpu
#endif
