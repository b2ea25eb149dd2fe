// Dense GEMV for one or two input rows with AVX2 + FMA intrinsics: the
// decode case, bound by reading the weight. bfloat16 weights widen to float
// in registers (a 16-bit shift) and feed the FMAs directly.
#include "linear_gemv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2.h"

namespace tokenmill::cpu {
namespace {

// R weight rows against two input rows: each weight load serves both rows.
template <typename TW, int R>
__attribute__((target("avx2,fma"))) void gemv_pair(const DenseGemv& a, int64_t j) {
  const TW* w = static_cast<const TW*>(a.weight) + j * a.k;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t k8 = a.k / 8 * 8;
  for (int64_t kk = 0; kk < k8; kk += 8) {
    const __m256 x0 = _mm256_loadu_ps(a.x + kk), x1 = _mm256_loadu_ps(a.x + a.k + kk);
    for (int r = 0; r < R; ++r) {
      // The rows of the next tile follow these ones in memory: fetch them early.
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * a.k + kk), _MM_HINT_T0);
      const __m256 wv = load8(w + r * a.k + kk);
      acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 2; ++i) {
      float total = hsum(acc[r][i]);
      for (int64_t kk = k8; kk < a.k; ++kk) total += to_float(w[r * a.k + kk]) * a.x[i * a.k + kk];
      a.out[i * a.n + j + r] = total;
    }
}

// One input row: the weight rows are read one after another, a single
// sequential stream per thread that the hardware prefetcher follows; x stays
// in L1 and four accumulators keep the FMA chains short.
template <typename TW>
__attribute__((target("avx2,fma"))) void gemv_single(const DenseGemv& a, int64_t n0, int64_t n1) {
  for (int64_t j = n0; j < n1; ++j) {
    const TW* w = static_cast<const TW*>(a.weight) + j * a.k;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    int64_t kk = 0;
    for (; kk + 32 <= a.k; kk += 32) {
      c0 = _mm256_fmadd_ps(load8(w + kk), _mm256_loadu_ps(a.x + kk), c0);
      c1 = _mm256_fmadd_ps(load8(w + kk + 8), _mm256_loadu_ps(a.x + kk + 8), c1);
      c2 = _mm256_fmadd_ps(load8(w + kk + 16), _mm256_loadu_ps(a.x + kk + 16), c2);
      c3 = _mm256_fmadd_ps(load8(w + kk + 24), _mm256_loadu_ps(a.x + kk + 24), c3);
    }
    for (; kk + 8 <= a.k; kk += 8)
      c0 = _mm256_fmadd_ps(load8(w + kk), _mm256_loadu_ps(a.x + kk), c0);
    float total = hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
    for (; kk < a.k; ++kk) total += to_float(w[kk]) * a.x[kk];
    a.out[j] = total;
  }
}

template <typename TW>
void gemv_typed(const DenseGemv& a, int64_t n0, int64_t n1) {
  if (a.m == 1) {
    gemv_single<TW>(a, n0, n1);
    return;
  }
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) gemv_pair<TW, 4>(a, j);
  for (; j < n1; ++j) gemv_pair<TW, 1>(a, j);
}

}  // namespace

bool dense_gemv_supported(int64_t m, int64_t k, DType w_dtype) {
  return cpu_has_avx2_fma() && m >= 1 && m <= 2 && k >= 16 &&
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
