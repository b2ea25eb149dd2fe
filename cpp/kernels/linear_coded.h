// The AVX2 path of the coded linear kernel (see linear_coded_avx2.cpp).
#pragma once

#include <cstdint>

#include "tokenmill/kernels.h"

namespace tokenmill::cpu {

// Where value c of a row keeps its code (layout in kernels.h, CodedBf16):
// the byte within its row's codes, and the nibble's shift in it.
inline int64_t code_byte(int64_t c) { return c / 64 * 32 + c % 32; }
inline int code_shift(int64_t c) { return c % 64 < 32 ? 0 : 4; }

// Whether this CPU has the fast path for m input rows.
bool coded_gemv_supported(int64_t m);
// x [m, k] float32 reordered into dst the way the kernel reads it.
void coded_gemv_order_x(float* dst, const float* x, int64_t m, int64_t k);
// out[i, j] = x[i] . w[j] for output columns n0..n1 (out float32 [m, w.n]),
// escapes left out; x ordered by coded_gemv_order_x.
void coded_gemv(const CodedBf16& w, float* out, const float* x, int64_t m, int64_t n0, int64_t n1);

}  // namespace tokenmill::cpu
