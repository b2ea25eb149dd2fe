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
constexpr int kGroupRows = 4;

// Bytes of one block's quants for one row, and of a group's scales per block.
constexpr int quant_bytes(GgufType t) { return t == GgufType::kQ8_0 ? 32 : 16; }
constexpr int scale_bytes(GgufType t) { return t == GgufType::kQ4_1 ? 16 : 8; }
constexpr int group_block_bytes(GgufType t) {
  return kGroupRows * quant_bytes(t) + scale_bytes(t);
}

// Activation rows quantized per block as llama.cpp's q8_0/q8_1: q = round(x / d),
// d = max|x| / 127. scales[i, b] holds {d x4, d * sum(q) x4}: the factors that
// a block's integer dot products and its weights' offsets meet.
struct Q8Activations {
  std::vector<int8_t> q;     // [m, k]
  std::vector<float> scales; // [m, k / 32, 8]
  int64_t m = 0, k = 0;
};

}  // namespace tokenmill::cpu::gguf_packed
