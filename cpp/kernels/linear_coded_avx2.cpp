// Coded bfloat16 GEMV with AVX2: per 64 weights of a row, two 32-byte loads of
// low bytes and one of codes; the codes' nibbles index the table with one
// byte shuffle each, and unpacking low with high bytes gives the bfloat16
// values, widened to float32 as in the dense kernel. 12 bits a weight
// instead of 16, for a few more instructions than a bfloat16 GEMV: a decode
// step that waits on memory spends the difference on them. As in the dense
// kernel, a thread reads runs of weight rows side by side, and takes input
// rows in chunks of up to four; each chunk decodes the tile again from L1.
#include "linear_coded.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2.h"

namespace tokenmill::cpu {
namespace {

constexpr int kBlock = 64;
// Low bytes (and half as far for codes) requested this far ahead of their
// use: the decode work between loads leaves the hardware prefetcher behind
// (Zen 3, 30 layers' weights from memory: 0.74-0.76 of the bfloat16 kernel's
// time with it, 0.86-0.89 without; 256 and 1024 bytes ahead did worse).
constexpr int kPrefetchBytes = 512;

// Where the kernel's lane order puts weight p (< 32) of a half block: vector
// v (unpacklo even, unpacklo odd, unpackhi even, unpackhi odd) lane l.
constexpr int lane_weight(int v, int l) { return (v < 2 ? 0 : 8) + l / 4 * 16 + l % 4 * 2 + v % 2; }

TM_AVX2 void widen_fma(__m256i lo, __m256i hi, const float* x, __m256& even, __m256& odd) {
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
  even = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_loadu_ps(x), even);
  odd =
      _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, mask)), _mm256_loadu_ps(x + 8), odd);
  even =
      _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), _mm256_loadu_ps(x + 16), even);
  odd =
      _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(b, mask)), _mm256_loadu_ps(x + 24), odd);
}

// R weight rows (j, j + stride, ...) against M input rows.
template <int M, int R>
__attribute__((target("avx2,fma"))) void gemv_coded(const CodedBf16& w, float* out, const float* x,
                                                    int64_t j, int64_t stride) {
  static_assert(M <= 4 && R * M <= 8, "accumulators beyond the registers");
  const int64_t k = w.k;
  const __m256i table =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table)));
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  // One input row keeps even and odd lanes apart for shorter FMA chains; two
  // share an accumulator (sixteen would take every register).
  constexpr int S = M == 1 ? 2 : 1;
  __m256 acc[R][M][S];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      for (int s = 0; s < S; ++s) acc[r][i][s] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += kBlock)
    for (int r = 0; r < R; ++r) {
      const int64_t row = j + r * stride;
      const uint8_t* low = w.low + row * k + kk;
      const uint8_t* codes = w.codes + row * (k / 2) + kk / 2;
      _mm_prefetch(reinterpret_cast<const char*>(low + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(codes + kPrefetchBytes / 2), _MM_HINT_T0);
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
      const __m256i hi0 = _mm256_shuffle_epi8(table, _mm256_and_si256(c, nibble));
      const __m256i hi1 =
          _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble));
      const __m256i lo0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low));
      const __m256i lo1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + 32));
      for (int i = 0; i < M; ++i) {
        widen_fma(lo0, hi0, x + i * k + kk, acc[r][i][0], acc[r][i][S - 1]);
        widen_fma(lo1, hi1, x + i * k + kk + 32, acc[r][i][0], acc[r][i][S - 1]);
      }
    }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      out[i * w.n + j + r * stride] =
          hsum(S == 2 ? _mm256_add_ps(acc[r][i][0], acc[r][i][S - 1]) : acc[r][i][0]);
}

// Four runs for one or two input rows; two for more, whose accumulators
// take the registers.
template <int R>
void gemv_rows(const CodedBf16& w, float* out, const float* x, int64_t m, int64_t n0, int64_t n1) {
  for_row_runs<R>(n0, n1, [&](auto runs, int64_t j, int64_t stride) {
    constexpr int tile = decltype(runs)::value;
    for_input_chunks<tile>(m, [&](auto rows, int64_t i) {
      gemv_coded<decltype(rows)::value, tile>(w, out + i * w.n, x + i * w.k, j, stride);
    });
  });
}

}  // namespace

bool coded_gemv_supported(int64_t m) { return cpu_has_avx2_fma() && m >= 1; }

void coded_gemv_order_x(float* dst, const float* x, int64_t m, int64_t k) {
  for (int64_t i = 0; i < m * k; i += 32)
    for (int v = 0; v < 4; ++v)
      for (int l = 0; l < 8; ++l) dst[i + v * 8 + l] = x[i + lane_weight(v, l)];
}

void coded_gemv(const CodedBf16& w, float* out, const float* x, int64_t m, int64_t n0, int64_t n1) {
  if (m <= 2)
    gemv_rows<4>(w, out, x, m, n0, n1);
  else
    gemv_rows<2>(w, out, x, m, n0, n1);
}

}  // namespace tokenmill::cpu

#else
namespace tokenmill::cpu {
bool coded_gemv_supported(int64_t) { return false; }
void coded_gemv_order_x(float*, const float*, int64_t, int64_t) {}
void coded_gemv(const CodedBf16&, float*, const float*, int64_t, int64_t, int64_t) {}
}  // namespace tokenmill::cpu
#endif
