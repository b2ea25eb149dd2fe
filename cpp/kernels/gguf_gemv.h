// The integer decode path of GGUF block products (see gguf_blocks_avx2.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "tokenmill/kernels.h"

namespace tokenmill::cpu {

// Activation rows quantized per 32 values: q = round(x / d) with d = max|x| / 127.
struct Q8Rows {
  std::vector<int8_t> q;   // [m, k]
  std::vector<float> d;    // [m, k / 32]
  std::vector<int32_t> s;  // [m, k / 32]: the sum of each block's q
  int64_t m = 0, blocks = 0;
};

// Whether this CPU has the integer path for this block type.
bool gguf_int8_supported(GgufType t);
void quantize_rows_q8(const float* x, int64_t m, int64_t k, Q8Rows& out);
// out[i, j] for weight rows j in [n0, n1) (one call per thread).
void gguf_linear_int8(const GgufWeight& w, const Q8Rows& x, float* out, int64_t n0, int64_t n1);

}  // namespace tokenmill::cpu
