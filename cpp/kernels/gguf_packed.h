// The packed GGUF layout shared by gguf_packed.cpp and its SIMD bodies.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "tokenmill/kernels.h"

namespace tokenmill::cpu::gguf_packed {

constexpr int kBlock = 32;

// A float16 value stored at p, as float.
inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
constexpr int kGroupRows = 8;

// A group's bytes per 32-weight block: 32-byte chunks of quants (four bytes
// of each row), for Q5_0 and Q5_K a 32-byte plane of fifth bits, then the
// rows' scales d0..d7 and a second factor f0..f7: float16 for the legacy
// types (Q4_1's minimums), float32 for the K types, whose block scales are
// products of two factors (Q4_K, Q5_K: d, then minimums, a weight d q - f;
// Q6_K: d of weights 0-15, then f of weights 16-31, a weight d (q - 32)).
constexpr bool k_type(GgufType t) {
  return t == GgufType::kQ4_K || t == GgufType::kQ5_K || t == GgufType::kQ6_K;
}
constexpr bool byte_quants(GgufType t) { return t == GgufType::kQ8_0 || t == GgufType::kQ6_K; }
constexpr bool fifth_bits(GgufType t) { return t == GgufType::kQ5_0 || t == GgufType::kQ5_K; }
constexpr bool two_factors(GgufType t) { return t == GgufType::kQ4_1 || k_type(t); }
constexpr int quant_chunks(GgufType t) { return byte_quants(t) ? 8 : 4; }
constexpr int plane_bytes(GgufType t) { return fifth_bits(t) ? 32 : 0; }
constexpr int scale_offset(GgufType t) { return 32 * quant_chunks(t) + plane_bytes(t); }
constexpr int factor_bytes(GgufType t) { return k_type(t) ? 32 : 16; }
constexpr int scale_bytes(GgufType t) { return factor_bytes(t) * (two_factors(t) ? 2 : 1); }
constexpr int group_block_bytes(GgufType t) { return scale_offset(t) + scale_bytes(t); }

// Chunk c (0-7) of a Q4 or Q5 block holds weights 4c .. 4c + 3 of each row in
// the low nibbles of chunk c (c < 4) or the high ones of chunk c - 4.
constexpr int nibble_chunk_weight(int c, int i) { return c < 4 ? 4 * c + i : 16 + 4 * (c - 4) + i; }

// Activation rows quantized per block as llama.cpp's q8_0/q8_1: q = round(x / d),
// d = max|x| / 127; or, wide, to 14 bits (d = max|x| / 8191) held as
// q = 128 high + low, both bytes, low in [0, 128). scales[i, b] holds {d, d * sum(q), d *
// sum(q[0:16]), d * sum(q[16:32])}: the factors that a block's integer dot products and its
// weights' offsets meet (Q6_K's offsets meet the halves).
constexpr int kActivationFactors = 4;
struct Q8Activations {
  std::vector<int8_t> q;      // [m, k]: q, or wide, its low bytes
  std::vector<int8_t> high;   // [m, k]: wide only
  std::vector<float> scales;  // [m, k / 32, kActivationFactors]
  int64_t m = 0, k = 0;
  bool wide = false;
};

}  // namespace tokenmill::cpu::gguf_packed
