// GGUF blocks repacked once at load for integer products: Q4_0, Q4_1, Q5_0 and
// Q8_0 weights in groups of eight rows. For each group and each 32-weight
// block, 32-byte chunks, chunk c holding bytes 4c .. 4c + 3 of each row's
// quants in turn (four chunks of nibbles: byte t carries weight t in its low
// nibble and weight t + 16 in its high one; eight chunks of Q8 bytes); for
// Q5_0 a plane whose byte 4j + i carries, in bit c, the fifth bit of the weight
// that chunk position's nibble c holds (nibble_chunk_weight); then the rows'
// float16 scales d0..d7, then (Q4_1) their minimums m0..m7. The bytes are the
// file's, moved: a group takes eight times a block's bytes. A weight is
// d * q + m, with m = -8 d (Q4_0), -16 d (Q5_0) or 0 (Q8_0, signed q).
// The K types (Q4_K, Q5_K, Q6_K) take the same layout per 32 weights with
// float32 scales (gguf_packed.h); the loader decodes their super-blocks.
#include "gguf_packed.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>

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
#define TM_GGUF_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
constexpr bool kVnni = true;
#include "gguf_packed_simd.h"
#undef TM_GGUF_TARGET
}  // namespace vnni

// TOKENMILL_DISABLE_AVX512 (or _AVX2) keeps the other paths tested here.
bool cpu_has_avx512_vnni() {
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni") &&
                         std::getenv("TOKENMILL_DISABLE_AVX512") == nullptr;
  return ok;
}
#endif

// Weights of row j of a group's block into dst[32], exactly.
void dequantize_row(GgufType t, const uint8_t* gb, int j, float* dst) {
  const uint8_t* scales = gb + scale_offset(t);
  float d, f;
  if (k_type(t)) {
    std::memcpy(&d, scales + 4 * j, 4);
    std::memcpy(&f, scales + 32 + 4 * j, 4);
  } else {
    d = half_to_float(scales + 2 * j);
    f = t == GgufType::kQ4_1 ? half_to_float(scales + 16 + 2 * j) : d;
  }
  if (byte_quants(t)) {
    for (int c = 0; c < 8; ++c)
      for (int i = 0; i < 4; ++i) {
        const uint8_t q = gb[32 * c + 4 * j + i];
        dst[4 * c + i] = t == GgufType::kQ8_0 ? d * static_cast<int8_t>(q)
                                              : (c < 4 ? d : f) * static_cast<float>(q - 32);
      }
    return;
  }
  const float m = t == GgufType::kQ4_1   ? f
                  : k_type(t)            ? -f
                  : t == GgufType::kQ5_0 ? -16.f * d
                                         : -8.f * d;
  for (int c = 0; c < 8; ++c)
    for (int i = 0; i < 4; ++i) {
      const uint8_t byte = gb[32 * (c % 4) + 4 * j + i];
      int q = c < 4 ? byte & 0x0f : byte >> 4;
      if (fifth_bits(t)) q |= ((gb[128 + 4 * j + i] >> c) & 1) << 4;
      dst[nibble_chunk_weight(c, i)] = q * d + m;
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
  return t == GgufType::kQ4_0 || t == GgufType::kQ4_1 || t == GgufType::kQ5_0 ||
         t == GgufType::kQ8_0 || k_type(t);
}

int64_t gguf_packed_group_bytes(GgufType t, int64_t k) { return group_block_bytes(t) * k / kBlock; }

void gguf_pack(const GgufWeight& w, uint8_t* packed) {
  if (!gguf_packed_supported(static_cast<int64_t>(w.type)) || k_type(w.type))
    throw std::invalid_argument("gguf_pack: Q4_0, Q4_1, Q5_0 or Q8_0 weights only");
  const GgufType t = w.type;
  const int64_t blocks = w.k / kBlock, in_bytes = gguf_block_bytes(t);
  const int64_t out_bytes = group_block_bytes(t), groups = (w.n + kGroupRows - 1) / kGroupRows;
  const int head = t == GgufType::kQ4_1 ? 4 : t == GgufType::kQ5_0 ? 6 : 2;
  const int chunks = quant_chunks(t);
  for_thread_ranges(groups, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* dst = packed + (g * blocks + b) * out_bytes;
        std::memset(dst, 0, out_bytes);  // rows past n stay zero
        uint8_t* scales = dst + scale_offset(t);
        for (int j = 0; j < kGroupRows && g * kGroupRows + j < w.n; ++j) {
          const uint8_t* src = w.data + (g * kGroupRows + j) * w.row_bytes + b * in_bytes;
          std::memcpy(scales + 2 * j, src, 2);
          if (t == GgufType::kQ4_1) std::memcpy(scales + 16 + 2 * j, src + 2, 2);
          for (int c = 0; c < chunks; ++c) std::memcpy(dst + 32 * c + 4 * j, src + head + 4 * c, 4);
          if (t == GgufType::kQ5_0) {
            uint32_t fifth;
            std::memcpy(&fifth, src + 2, 4);
            for (int i = 0; i < 4; ++i)
              for (int c = 0; c < 8; ++c)
                dst[128 + 4 * j + i] |= ((fifth >> nibble_chunk_weight(c, i)) & 1u) << c;
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

namespace {

#if TM_GGUF_SIMD
// Activations quantized once per call into a buffer each calling thread reuses.
Q8Activations& quantized(const GgufWeight& w, DType dtype, const void* x, int64_t x_stride,
                         int64_t m, bool wide, bool vnni) {
  thread_local Q8Activations buffer;
  Q8Activations& xq = buffer;  // the worker threads below fill this thread's buffer
  xq.m = m;
  xq.k = w.k;
  xq.wide = wide;
  xq.q.resize(static_cast<size_t>(m * w.k));
  if (wide) xq.high.resize(static_cast<size_t>(m * w.k));
  xq.scales.resize(static_cast<size_t>(m * (w.k / kBlock) * kActivationFactors));
  dispatch_dtype(dtype, [&](auto tag) {
    using In = decltype(tag);
    const In* xp = static_cast<const In*>(x);
    if constexpr (std::is_same_v<In, float> || std::is_same_v<In, bf16>) {
      for_thread_ranges(m, [&](int64_t i0, int64_t i1) {
        vnni ? vnni::quantize(xp, x_stride, i0, i1, xq) : avx2::quantize(xp, x_stride, i0, i1, xq);
      });
    } else {
      std::vector<float> xf(static_cast<size_t>(m * w.k));
      rows_to_float(dtype, xf.data(), x, m, w.k, x_stride, w.k);
      for_thread_ranges(m, [&](int64_t i0, int64_t i1) {
        vnni ? vnni::quantize(xf.data(), w.k, i0, i1, xq)
             : avx2::quantize(xf.data(), w.k, i0, i1, xq);
      });
    }
  });
  return xq;
}
#endif

void linear_portable_rows(const GgufWeight& w, DType x_dtype, const void* x, int64_t x_stride,
                          int64_t m, DType out_dtype, void* out, int64_t out_stride) {
  const int64_t groups = (w.n + kGroupRows - 1) / kGroupRows;
  std::vector<float> xf(static_cast<size_t>(m * w.k)), of(static_cast<size_t>(m * w.n));
  rows_to_float(x_dtype, xf.data(), x, m, w.k, x_stride, w.k);
  for_thread_ranges(
      groups, [&](int64_t g0, int64_t g1) { linear_portable(w, xf.data(), m, of.data(), g0, g1); });
  rows_from_float(out_dtype, out, of.data(), m, w.n, out_stride, w.n);
}

}  // namespace

void gguf_packed_linear(const GgufWeight& w, DType x_dtype, const void* x, int64_t x_stride,
                        int64_t m, DType out_dtype, void* out, int64_t out_stride,
                        int activation_bits) {
  if (activation_bits != 8 && activation_bits != 14)
    throw std::invalid_argument("gguf_packed_linear: activation_bits must be 8 or 14");
  if (m == 0) return;
#if TM_GGUF_SIMD
  if (cpu_has_avx2_fma() && out_dtype != DType::kFloat16) {
    const bool vnni = cpu_has_avx512_vnni();
    const Q8Activations& xq = quantized(w, x_dtype, x, x_stride, m, activation_bits == 14, vnni);
    const int64_t groups = (w.n + kGroupRows - 1) / kGroupRows;
    dispatch_dtype(out_dtype, [&](auto tag) {
      using Out = decltype(tag);
      if constexpr (std::is_same_v<Out, float> || std::is_same_v<Out, bf16>) {
        Out* op = static_cast<Out*>(out);
        for_thread_ranges(groups, [&](int64_t g0, int64_t g1) {
          vnni ? vnni::linear(w, xq, op, out_stride, g0, g1)
               : avx2::linear(w, xq, op, out_stride, g0, g1);
        });
      }
    });
    return;
  }
#endif
  linear_portable_rows(w, x_dtype, x, x_stride, m, out_dtype, out, out_stride);
}

}  // namespace tokenmill::cpu
