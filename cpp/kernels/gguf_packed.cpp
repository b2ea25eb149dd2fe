// GGUF blocks repacked once at load for integer products: Q4_0, Q4_1 and Q8_0
// weights in groups of four rows. For each group and each 32-weight block:
//   Q4_0, Q4_1: 4 x 16 bytes of nibbles (row j at 16 j: weight t in the low
//               nibble of byte t, weight t + 16 in its high nibble), then the
//               rows' float16 scales d0..d3, then (Q4_1) minimums m0..m3;
//   Q8_0:       rows 0 and 1 weights 0-15, rows 0 and 1 weights 16-31, the
//               same for rows 2 and 3 (16 bytes each), then d0..d3.
// The bytes are the file's, moved; a group takes four times a block's bytes.
// A weight is d * q + m, with m = -8 d for Q4_0 and 0 for Q8_0 (signed q).
#include "gguf_packed.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "avx2.h"
#define TM_GGUF_SIMD 1
#endif

namespace tokenmill::cpu {
namespace gguf_packed {
namespace {

#if TM_GGUF_SIMD
namespace avx2 {
#define TM_GGUF_TARGET __attribute__((target("avx2,fma,f16c")))
constexpr bool kVnni = false;
#include "gguf_packed_simd.h"
#undef TM_GGUF_TARGET
}  // namespace avx2

namespace vnni {
#define TM_GGUF_TARGET \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
constexpr bool kVnni = true;
#include "gguf_packed_simd.h"
#undef TM_GGUF_TARGET
}  // namespace vnni

// TOKENMILL_DISABLE_AVX512 (or _AVX2) keeps the other paths tested here.
bool cpu_has_avx512_vnni() {
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni") &&
                         std::getenv("TOKENMILL_DISABLE_AVX512") == nullptr;
  return ok;
}
#endif

// Weights of row j of a group's block into dst[32], exactly.
void dequantize_row(GgufType t, const uint8_t* gb, int j, float* dst) {
  const uint8_t* scales = gb + kGroupRows * quant_bytes(t);
  const float d = half_to_float(scales + 2 * j);
  if (t == GgufType::kQ8_0) {
    const auto* low = reinterpret_cast<const int8_t*>(gb + 64 * (j / 2) + 16 * (j % 2));
    for (int i = 0; i < 16; ++i) {
      dst[i] = d * low[i];
      dst[i + 16] = d * low[i + 32];
    }
    return;
  }
  const float m = t == GgufType::kQ4_1 ? half_to_float(scales + 8 + 2 * j) : -8.f * d;
  const uint8_t* q = gb + 16 * j;
  for (int i = 0; i < 16; ++i) {
    dst[i] = (q[i] & 0x0f) * d + m;
    dst[i + 16] = (q[i] >> 4) * d + m;
  }
}

// The exact product where no integer path exists: each block dequantized once.
void linear_portable(const GgufWeight& w, const float* x, int64_t m, float* out, int64_t g0,
                     int64_t g1) {
  const int64_t blocks = w.k / kBlock, bytes = group_block_bytes(w.type);
  std::vector<float> acc(static_cast<size_t>(m * kGroupRows * kBlock));
  float block[kBlock];
  for (int64_t g = g0; g < g1; ++g) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < blocks; ++b)
      for (int j = 0; j < kGroupRows; ++j) {
        dequantize_row(w.type, w.data + g * w.row_bytes + b * bytes, j, block);
        for (int64_t i = 0; i < m; ++i) {
          float* a = acc.data() + (i * kGroupRows + j) * kBlock;
          const float* xb = x + i * w.k + b * kBlock;
          for (int t = 0; t < kBlock; ++t) a[t] += block[t] * xb[t];
        }
      }
    for (int64_t i = 0; i < m; ++i)
      for (int j = 0; j < kGroupRows && g * kGroupRows + j < w.n; ++j) {
        const float* a = acc.data() + (i * kGroupRows + j) * kBlock;
        float s = 0.f;
        for (int t = 0; t < kBlock; ++t) s += a[t];
        out[i * w.n + g * kGroupRows + j] = s;
      }
  }
}

}  // namespace
}  // namespace gguf_packed

using namespace gguf_packed;

bool gguf_packed_supported(int64_t ggml_type) {
  const auto t = static_cast<GgufType>(ggml_type);
  return t == GgufType::kQ4_0 || t == GgufType::kQ4_1 || t == GgufType::kQ8_0;
}

int64_t gguf_packed_group_bytes(GgufType t, int64_t k) { return group_block_bytes(t) * k / kBlock; }

void gguf_pack(const GgufWeight& w, uint8_t* packed) {
  if (!gguf_packed_supported(static_cast<int64_t>(w.type)))
    throw std::invalid_argument("gguf_pack: Q4_0, Q4_1 or Q8_0 weights only");
  const GgufType t = w.type;
  const int64_t blocks = w.k / kBlock, in_bytes = gguf_block_bytes(t);
  const int64_t out_bytes = group_block_bytes(t), groups = (w.n + kGroupRows - 1) / kGroupRows;
  const int head = t == GgufType::kQ4_1 ? 4 : 2, quants = quant_bytes(t);
  for_thread_ranges(groups, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* dst = packed + (g * blocks + b) * out_bytes;
        std::memset(dst, 0, out_bytes);  // rows past n stay zero
        uint8_t* scales = dst + kGroupRows * quants;
        for (int j = 0; j < kGroupRows && g * kGroupRows + j < w.n; ++j) {
          const uint8_t* src = w.data + (g * kGroupRows + j) * w.row_bytes + b * in_bytes;
          std::memcpy(scales + 2 * j, src, 2);
          if (t == GgufType::kQ4_1) std::memcpy(scales + 8 + 2 * j, src + 2, 2);
          if (t == GgufType::kQ8_0) {
            uint8_t* low = dst + 64 * (j / 2) + 16 * (j % 2);
            std::memcpy(low, src + head, 16);
            std::memcpy(low + 32, src + head + 16, 16);
          } else {
            std::memcpy(dst + 16 * j, src + head, 16);
          }
        }
      }
  });
}

void gguf_packed_rows(const GgufWeight& w, const int64_t* rows, int64_t count, float* out) {
  const int64_t blocks = w.k / kBlock, bytes = group_block_bytes(w.type);
  for_thread_ranges(count, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = rows[c] / kGroupRows, j = rows[c] % kGroupRows;
      for (int64_t b = 0; b < blocks; ++b)
        dequantize_row(w.type, w.data + g * w.row_bytes + b * bytes, static_cast<int>(j),
                       out + c * w.k + b * kBlock);
    }
  });
}

void gguf_packed_linear(const GgufWeight& w, const float* x, int64_t m, float* out) {
  const int64_t groups = (w.n + kGroupRows - 1) / kGroupRows;
#if TM_GGUF_SIMD
  if (cpu_has_avx2_fma()) {
    const bool vnni = cpu_has_avx512_vnni();
    Q8Activations xq;
    xq.m = m;
    xq.k = w.k;
    xq.q.resize(static_cast<size_t>(m * w.k));
    xq.scales.resize(static_cast<size_t>(m * (w.k / kBlock) * 8));
    for_thread_ranges(m, [&](int64_t i0, int64_t i1) {
      vnni ? vnni::quantize(x, i0, i1, xq) : avx2::quantize(x, i0, i1, xq);
    });
    for_thread_ranges(groups, [&](int64_t g0, int64_t g1) {
      vnni ? vnni::linear(w, xq, out, g0, g1) : avx2::linear(w, xq, out, g0, g1);
    });
    return;
  }
#endif
  for_thread_ranges(groups,
                    [&](int64_t g0, int64_t g1) { linear_portable(w, x, m, out, g0, g1); });
}

}  // namespace tokenmill::cpu
