// GGUF block products with 8-bit activations and AVX2 integer dot products,
// as llama.cpp takes them: activations are quantized once per step to 32-value
// blocks of int8 with a float scale, and each weight block meets each
// activation block in one unsigned x signed multiply-add (vpmaddubsw) of 32
// pairs. Q4_1's minimum and Q4_0's offset of 8 meet the activation block's sum.
#include <cmath>

#include "gguf_gemv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "avx2.h"

namespace tokenmill::cpu {
namespace {

#define TM_GGUF __attribute__((target("avx2,fma,f16c")))

TM_GGUF inline float half_at(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

TM_GGUF inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of the 32 products of unsigned u and signed s, as 8 float lanes.
TM_GGUF inline __m256 dot_us(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// acc + block b of a row against activation row i, in 8 float lanes; for
// offset formats, the offset's share goes to `extra`.
template <GgufType T>
TM_GGUF inline __m256 block_dot(__m256 acc, const uint8_t* blk, const Q8Rows& x, int64_t i,
                                int64_t b, int64_t k, float& extra) {
  const float d = half_at(blk), dx = x.d[i * x.blocks + b];
  const __m256i xs =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + i * k + b * 32));
  if constexpr (T == GgufType::kQ8_0) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    return _mm256_fmadd_ps(dot_us(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xs, q)),
                           _mm256_set1_ps(d * dx), acc);
  } else {
    constexpr bool kMin = T == GgufType::kQ4_1;
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (kMin ? 4 : 2)));
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                       _mm256_set1_epi8(0x0f));  // weights 0-15, then 16-31
    extra += (kMin ? half_at(blk + 2) : -8.f * d) * dx * static_cast<float>(x.s[i * x.blocks + b]);
    return _mm256_fmadd_ps(dot_us(q, xs), _mm256_set1_ps(d * dx), acc);
  }
}

// Four blocks per step into four accumulators: independent chains, so the
// adds' latency does not bound a row.
template <GgufType T>
TM_GGUF void rows_typed(const GgufWeight& w, const Q8Rows& x, float* out, int64_t n0, int64_t n1) {
  const int64_t blocks = w.k / 32, bytes = gguf_block_bytes(T);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = w.data + j * w.row_bytes;
    for (int64_t i = 0; i < x.m; ++i) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      float extra[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t b = 0;
      for (; b + 4 <= blocks; b += 4)
        for (int u = 0; u < 4; ++u)
          acc[u] = block_dot<T>(acc[u], row + (b + u) * bytes, x, i, b + u, w.k, extra[u]);
      for (; b < blocks; ++b)
        acc[0] = block_dot<T>(acc[0], row + b * bytes, x, i, b, w.k, extra[0]);
      const __m256 sum =
          _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
      out[i * w.n + j] = hsum(sum) + (extra[0] + extra[1]) + (extra[2] + extra[3]);
    }
  }
}

}  // namespace

bool gguf_int8_supported(GgufType t) {
  return cpu_has_avx2_fma() &&
         (t == GgufType::kQ4_0 || t == GgufType::kQ4_1 || t == GgufType::kQ8_0);
}

void quantize_rows_q8(const float* x, int64_t m, int64_t k, Q8Rows& out) {
  out.m = m;
  out.blocks = k / 32;
  out.q.resize(static_cast<size_t>(m * k));
  out.d.resize(static_cast<size_t>(m * out.blocks));
  out.s.resize(static_cast<size_t>(m * out.blocks));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < out.blocks; ++b) {
      const float* v = x + i * k + b * 32;
      float amax = 0.f;
      for (int t = 0; t < 32; ++t) amax = std::max(amax, std::fabs(v[t]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int t = 0; t < 32; ++t) {
        const int q = static_cast<int>(std::nearbyint(v[t] * inv));
        out.q[i * k + b * 32 + t] = static_cast<int8_t>(q);
        sum += q;
      }
      out.d[i * out.blocks + b] = d;
      out.s[i * out.blocks + b] = sum;
    }
}

void gguf_linear_int8(const GgufWeight& w, const Q8Rows& x, float* out, int64_t n0, int64_t n1) {
  switch (w.type) {
    case GgufType::kQ4_0:
      return rows_typed<GgufType::kQ4_0>(w, x, out, n0, n1);
    case GgufType::kQ4_1:
      return rows_typed<GgufType::kQ4_1>(w, x, out, n0, n1);
    case GgufType::kQ8_0:
      return rows_typed<GgufType::kQ8_0>(w, x, out, n0, n1);
    default:
      break;
  }
}

}  // namespace tokenmill::cpu

#else
namespace tokenmill::cpu {
bool gguf_int8_supported(GgufType) { return false; }
void quantize_rows_q8(const float*, int64_t, int64_t, Q8Rows&) {}
void gguf_linear_int8(const GgufWeight&, const Q8Rows&, float*, int64_t, int64_t) {}
}  // namespace tokenmill::cpu
#endif
