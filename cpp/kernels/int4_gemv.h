// The decode fast path of the int4 linear layer (see int4_gemv_avx2.cpp).
#pragma once

#include <cstdint>

namespace tokenmill::cpu {

struct Int4Gemv {
  float* out;                 // [m, n]
  const float* x;             // [m, k_padded]
  const float* x_group_sums;  // [m, groups]: sum of x over each group
  int64_t m;
  const uint8_t* qweight;
  const float* scales;
  const float* zeros;
  int64_t k_padded, n, groups, group_size;
};

// Whether this CPU has the fast path for m activation rows.
bool int4_gemv_supported(int64_t m);
// Output columns n0..n1: one call per thread, on a contiguous range.
void int4_gemv(const Int4Gemv& a, int64_t n0, int64_t n1);

}  // namespace tokenmill::cpu
