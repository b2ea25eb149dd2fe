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

// A group's bytes per block: 32-byte chunks of quants (four bytes of each
// row), for Q5_0 a 32-byte plane of fifth bits, then float16 scales d0..d7
// and (Q4_1) minimums m0..m7.
constexpr int quant_chunks(GgufType t) { return t == GgufType::kQ8_0 ? 8 : 4; }
constexpr int plane_bytes(GgufType t) { return t == GgufType::kQ5_0 ? 32 : 0; }
constexpr int scale_offset(GgufType t) { return 32 * quant_chunks(t) + plane_bytes(t); }
constexpr int scale_bytes(GgufType t) { return t == GgufType::kQ4_1 ? 32 : 16; }
constexpr int group_block_bytes(GgufType t) { return scale_offset(t) + scale_bytes(t); }

// Chunk c (0-7) of a Q4 or Q5 block holds weights 4c .. 4c + 3 of each row in
// the low nibbles of chunk c (c < 4) or the high ones of chunk c - 4.
constexpr int nibble_chunk_weight(int c, int i) { return c < 4 ? 4 * c + i : 16 + 4 * (c - 4) + i; }

// Activation rows quantized per block as llama.cpp's q8_0/q8_1: q = round(x / d),
// d = max|x| / 127. scales[i, b] holds {d, d * sum(q)}: the factors that a
// block's integer dot products and its weights' offsets meet.
struct Q8Activations {
  std::vector<int8_t> q;      // [m, k]
  std::vector<float> scales;  // [m, k / 32, 2]
  int64_t m = 0, k = 0;
};

}  // namespace tokenmill::cpu::gguf_packed
