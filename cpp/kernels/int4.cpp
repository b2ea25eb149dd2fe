// Weight-only int4 linear layers. tokenmill's int4 layout (converted at load
// from GPTQ and AWQ checkpoints without leaving 4 bits):
//   qweight uint8 [N, K/2]: for output row n, each run of 32 inputs k0..k0+31
//     is 16 bytes; byte j holds k0+j in its low nibble and k0+16+j in its high
//     nibble. K is padded to a multiple of 32.
//   scales, zeros float32 [N, ceil(K/group_size)]: w[n, k] = q * scale - zero, with
//     zero = zero_point * scale folded in at load.
// Dequantization happens in registers, a tile of rows at a time, so a decode
// step reads about a quarter of the bytes of bf16 weights.
#include <algorithm>
#include <vector>

#include "common.h"
#include "int4_gemv.h"

namespace tokenmill::cpu {
namespace {

constexpr int kRows = 4;

__attribute__((always_inline)) inline void dequant_row(float* dst, const uint8_t* q,
                                                       const float* scales, const float* zeros,
                                                       int64_t k_padded, int64_t group_size) {
  for (int64_t k0 = 0; k0 < k_padded; k0 += 32) {
    const int64_t g = k0 / group_size;
    const float s = scales[g], z = zeros[g];
    const uint8_t* b = q + k0 / 2;
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
      dst[k0 + j] = static_cast<float>(b[j] & 15) * s - z;
      dst[k0 + 16 + j] = static_cast<float>(b[j] >> 4) * s - z;
    }
  }
}

TM_MULTIVERSION void int4_rows(float* out, const float* x, int64_t m, const uint8_t* qweight,
                               const float* scales, const float* zeros, int64_t k_padded,
                               int64_t groups, int64_t group_size, int64_t n0, int64_t n1,
                               int64_t n, float* wbuf) {
  for (int64_t j = n0; j < n1; j += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - j));
    for (int r = 0; r < kRows; ++r) {
      if (r < rows)
        dequant_row(wbuf + r * k_padded, qweight + (j + r) * (k_padded / 2),
                    scales + (j + r) * groups, zeros + (j + r) * groups, k_padded, group_size);
      else
        std::fill(wbuf + r * k_padded, wbuf + (r + 1) * k_padded, 0.f);
    }
    for (int64_t mi = 0; mi < m; ++mi) {
      float acc[kRows];
      dot4(x + mi * k_padded, wbuf, k_padded, acc);
      for (int r = 0; r < rows; ++r) out[mi * n + j + r] = acc[r];
    }
  }
}

TM_MULTIVERSION void dequant_rows(float* out, const uint8_t* qweight, const float* scales,
                                  const float* zeros, int64_t k_padded, int64_t groups,
                                  int64_t group_size, int64_t n0, int64_t n1) {
  for (int64_t j = n0; j < n1; ++j)
    dequant_row(out + (j - n0) * k_padded, qweight + j * (k_padded / 2), scales + j * groups,
                zeros + j * groups, k_padded, group_size);
}

}  // namespace

void int4_linear(float* out, const float* x, int64_t m, const uint8_t* qweight, const float* scales,
                 const float* zeros, int64_t k_padded, int64_t n, int64_t group_size) {
  if (k_padded % 32 || group_size % 32 || group_size <= 0)
    throw std::invalid_argument("int4 layout needs K and group_size multiples of 32");
  const int64_t groups = (k_padded + group_size - 1) / group_size;  // last may be partial
  const int64_t chunk = std::max<int64_t>(kRows, (n / 64 + kRows - 1) / kRows * kRows);
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (int4_gemv_supported(m)) {
    std::vector<float> sums(static_cast<size_t>(m * groups), 0.f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t k = 0; k < k_padded; ++k)
        sums[i * groups + k / group_size] += x[i * k_padded + k];
    const Int4Gemv a{out,   x,        sums.data(), m,      qweight,   scales,
                     zeros, k_padded, n,           groups, group_size};
    for_thread_ranges(n, [&](int64_t n0, int64_t n1) { int4_gemv(a, n0, n1); });
    return;
  }
#pragma omp parallel
  {
    std::vector<float> wbuf(static_cast<size_t>(kRows) * k_padded);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c)
      int4_rows(out, x, m, qweight, scales, zeros, k_padded, groups, group_size, c * chunk,
                std::min(n, (c + 1) * chunk), n, wbuf.data());
  }
}

void int4_dequantize(float* out, const uint8_t* qweight, const float* scales, const float* zeros,
                     int64_t k_padded, int64_t group_size, int64_t n0, int64_t n1) {
  if (k_padded % 32 || group_size % 32 || group_size <= 0)
    throw std::invalid_argument("int4 layout needs K and group_size multiples of 32");
  const int64_t groups = (k_padded + group_size - 1) / group_size;  // last may be partial
#pragma omp parallel for schedule(static) if (n1 - n0 > 16)
  for (int64_t j = n0; j < n1; ++j)
    dequant_rows(out + (j - n0) * k_padded, qweight, scales, zeros, k_padded, groups, group_size, j,
                 j + 1);
}

}  // namespace tokenmill::cpu
