// int4 GEMV for a few activation rows with AVX2 + FMA intrinsics: the
// decode case, where the weight is read once and the kernel must keep up
// with memory. Each 16-byte run of 32 nibbles is widened to floats in
// registers and multiplied with x straight away; scale and zero apply once
// per group through  sum_k x_k (q_k s - z) = s sum_k x_k q_k - z sum_k x_k.
#include "int4_gemv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <algorithm>

#include "avx2.h"

namespace tokenmill::cpu {
namespace {

// The 32 weights of one run as four vectors of eight, in input order. Bytes
// widen to 32-bit lanes straight from memory; the nibbles separate there.
TM_AVX2 void unpack_run(const uint8_t* q, __m256 w[4]) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
  w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
  w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

// R weight rows (j, j + stride, ...) against M activation rows from i0. Each
// run of a weight row is widened once for all M rows, whose activations come
// from L1 as FMA operands; per group the scale folds in with one vector FMA
// and the zero as a scalar, so the horizontal sum happens once per output. A
// thread's rows are split into R long runs read side by side (as in the
// dense GEMV): each is a sequential stream the hardware prefetcher follows,
// where R adjacent short rows were not.
template <int R, int M>
__attribute__((target("avx2,fma"))) void gemv_tile(const Int4Gemv& a, int64_t j, int64_t stride,
                                                   int64_t i0) {
  const int64_t runs = a.k_padded / 32, runs_per_group = a.group_size / 32;
  const int64_t row_bytes = a.k_padded / 2, rs = stride * row_bytes;
  const uint8_t* q = a.qweight + j * row_bytes;
  const float* x = a.x + i0 * a.k_padded;
  const float* group_sums = a.x_group_sums + i0 * a.groups;
  __m256 total[R][M];
  float zero_terms[R][M] = {};
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) total[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
    const int64_t r_end = std::min(runs, (g + 1) * runs_per_group);
    for (int64_t run = g * runs_per_group; run < r_end; ++run) {
      for (int r = 0; r < R; ++r) {
        __m256 w[4];
        unpack_run(q + r * rs + run * 16, w);
        for (int i = 0; i < M; ++i)
          for (int c = 0; c < 4; ++c)
            acc[r][i] = _mm256_fmadd_ps(
                w[c], _mm256_loadu_ps(x + i * a.k_padded + run * 32 + 8 * c), acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_broadcast_ss(a.scales + (j + r * stride) * a.groups + g);
      const float z = a.zeros[(j + r * stride) * a.groups + g];
      for (int i = 0; i < M; ++i) {
        total[r][i] = _mm256_fmadd_ps(s, acc[r][i], total[r][i]);
        zero_terms[r][i] += z * group_sums[i * a.groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      a.out[(i0 + i) * a.n + j + r * stride] = hsum(total[r][i]) - zero_terms[r][i];
}

// Four runs for one activation row; two for more, whose accumulators take the
// registers.
template <int R>
void gemv_rows(const Int4Gemv& a, int64_t n0, int64_t n1) {
  for_row_runs<R>(n0, n1, [&](auto runs, int64_t j, int64_t stride) {
    constexpr int tile = decltype(runs)::value;
    for_input_chunks<tile>(a.m, [&](auto rows, int64_t i) {
      gemv_tile<tile, decltype(rows)::value>(a, j, stride, i);
    });
  });
}

}  // namespace

bool int4_gemv_supported(int64_t m) { return cpu_has_avx2_fma() && m >= 1; }

void int4_gemv(const Int4Gemv& a, int64_t n0, int64_t n1) {
  if (a.m == 1)
    gemv_rows<4>(a, n0, n1);
  else
    gemv_rows<2>(a, n0, n1);
}

}  // namespace tokenmill::cpu

#else
namespace tokenmill::cpu {
bool int4_gemv_supported(int64_t) { return false; }
void int4_gemv(const Int4Gemv&, int64_t, int64_t) {}
}  // namespace tokenmill::cpu
#endif
