// GGUF block formats, read as stored: every 32 weights of a row share a
// float16 scale (Q4_0, Q5_0, Q8_0) or a scale and a minimum (Q4_1, Q5_1).
// A decode-sized product dequantizes each block once into 32 floats and
// takes its dot products with every activation row from there, so a weight
// is read once per step at 4.5 to 8.5 bits; the products are exact float32
// products of the dequantized values (what gguf's own dequantizers give).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "gguf_packed.h"
#include "tokenmill/kernels.h"

namespace tokenmill::cpu {
namespace {

using gguf_packed::kBlock;
constexpr auto half = gguf_packed::half_to_float;

// 32 weights of block `b` into dst.
template <GgufType T>
inline void dequantize_block(const uint8_t* b, float* dst) {
  if constexpr (T == GgufType::kQ8_0) {
    const float d = half(b);
    const auto* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < kBlock; ++i) dst[i] = d * q[i];
  } else if constexpr (T == GgufType::kQ4_0 || T == GgufType::kQ4_1) {
    const bool has_min = T == GgufType::kQ4_1;
    const float d = half(b), m = has_min ? half(b + 2) : -8.f * d;
    const uint8_t* q = b + (has_min ? 4 : 2);
    for (int i = 0; i < kBlock / 2; ++i) {
      dst[i] = (q[i] & 0x0f) * d + m;
      dst[i + 16] = (q[i] >> 4) * d + m;
    }
  } else {  // Q5_0, Q5_1: a fifth bit per weight in a 32-bit word
    const bool has_min = T == GgufType::kQ5_1;
    const float d = half(b), m = has_min ? half(b + 2) : -16.f * d;
    uint32_t high;
    std::memcpy(&high, b + (has_min ? 4 : 2), 4);
    const uint8_t* q = b + (has_min ? 8 : 6);
    for (int i = 0; i < kBlock / 2; ++i) {
      dst[i] = static_cast<float>((q[i] & 0x0f) | (((high >> i) & 1u) << 4)) * d + m;
      dst[i + 16] = static_cast<float>((q[i] >> 4) | (((high >> (i + 16)) & 1u) << 4)) * d + m;
    }
  }
}

template <GgufType T>
TM_MULTIVERSION void dequantize_rows_typed(const GgufWeight& w, float* out, int64_t r0,
                                           int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < w.k / kBlock; ++b)
      dequantize_block<T>(w.data + r * w.row_bytes + b * gguf_block_bytes(T),
                          out + (r - r0) * w.k + b * kBlock);
}

// out[i, j] for rows j in [n0, n1) of the weight and every activation row i.
template <GgufType T>
TM_MULTIVERSION void linear_rows(const GgufWeight& w, const float* x, int64_t m, float* out,
                                 int64_t n0, int64_t n1) {
  // Lane-wise sums over the row's blocks, reduced once at its end.
  constexpr int kMaxM = 16;
  alignas(64) float block[kBlock];
  alignas(64) float acc[kMaxM][kBlock];
  const int64_t blocks = w.k / kBlock, bytes = gguf_block_bytes(T);
  for (int64_t j = n0; j < n1; ++j) {
    for (int64_t i = 0; i < m; ++i) std::fill(acc[i], acc[i] + kBlock, 0.f);
    const uint8_t* row = w.data + j * w.row_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      dequantize_block<T>(row + b * bytes, block);
      for (int64_t i = 0; i < m; ++i) {
        const float* xb = x + i * w.k + b * kBlock;
#pragma omp simd
        for (int t = 0; t < kBlock; ++t) acc[i][t] += block[t] * xb[t];
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      float s = 0.f;
      for (int t = 0; t < kBlock; ++t) s += acc[i][t];
      out[i * w.n + j] = s;
    }
  }
}

template <class Fn>
void dispatch(GgufType t, Fn&& fn) {
  switch (t) {
    case GgufType::kQ4_0:
      return fn(std::integral_constant<GgufType, GgufType::kQ4_0>{});
    case GgufType::kQ4_1:
      return fn(std::integral_constant<GgufType, GgufType::kQ4_1>{});
    case GgufType::kQ5_0:
      return fn(std::integral_constant<GgufType, GgufType::kQ5_0>{});
    case GgufType::kQ5_1:
      return fn(std::integral_constant<GgufType, GgufType::kQ5_1>{});
    case GgufType::kQ8_0:
      return fn(std::integral_constant<GgufType, GgufType::kQ8_0>{});
    default:
      throw std::invalid_argument("unsupported GGUF block type");
  }
}

}  // namespace

bool gguf_type_supported(int64_t ggml_type) {
  switch (static_cast<GgufType>(ggml_type)) {
    case GgufType::kQ4_0:
    case GgufType::kQ4_1:
    case GgufType::kQ5_0:
    case GgufType::kQ5_1:
    case GgufType::kQ8_0:
      return true;
    default:  // the K types run packed only (gguf_packed.cpp)
      return false;
  }
}

void gguf_dequantize(const GgufWeight& w, float* out, int64_t r0, int64_t r1) {
  dispatch(w.type, [&](auto t) {
    for_thread_ranges(r1 - r0, [&](int64_t a, int64_t b) {
      dequantize_rows_typed<decltype(t)::value>(w, out + a * w.k, r0 + a, r0 + b);
    });
  });
}

void gguf_linear(const GgufWeight& w, const float* x, int64_t m, float* out) {
  if (m > 16) throw std::invalid_argument("gguf_linear takes up to 16 rows");
  dispatch(w.type, [&](auto t) {
    for_thread_ranges(w.n, [&](int64_t n0, int64_t n1) {
      linear_rows<decltype(t)::value>(w, x, m, out, n0, n1);
    });
  });
}

}  // namespace tokenmill::cpu
