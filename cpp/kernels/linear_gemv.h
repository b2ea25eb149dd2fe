// The decode fast path of the dense linear kernel (see linear_gemv_avx2.cpp).
#pragma once

#include <cstdint>

#include "tokenmill/kernel_params.h"

namespace tokenmill::cpu {

struct DenseGemv {
  float* out;          // [m, n] float32 results (bias and output dtype are the caller's)
  const float* x;      // [m, k], ordered by dense_gemv_order_x
  const void* weight;  // [n, k], float32 or bfloat16
  DType w_dtype;
  int64_t m, k, n;
};

// Whether this CPU has the fast path for m rows of this weight dtype.
bool dense_gemv_supported(int64_t m, int64_t k, DType w_dtype);
// Reorders x in place the way the kernel reads it for this weight dtype.
void dense_gemv_order_x(float* x, int64_t m, int64_t k, DType w_dtype);
// Output columns n0..n1: one call per thread, on a contiguous range.
void dense_gemv(const DenseGemv& a, int64_t n0, int64_t n1);

}  // namespace tokenmill::cpu
