// Dense projections for few rows (decode): out[M, N] = x[M, K] @ w[N, K]^T.
// Memory-bound, so each weight row is read once for all M input rows: a
// thread converts a tile of weight rows to float32 in L1 and takes the dot
// products of every input row with it. Parallel over output columns.
#include <algorithm>
#include <vector>

#include "common.h"
#include "linear_coded.h"
#include "linear_gemv.h"

namespace tokenmill::cpu {
namespace {

constexpr int kRows = 4;  // weight rows per tile

template <typename TX, typename TW>
__attribute__((always_inline)) inline void linear_tile(void* out, const void* x, const void* w,
                                                       const void* bias, int64_t m_rows, int64_t k,
                                                       int64_t n, int64_t n0, int64_t n1,
                                                       int64_t x_stride, int64_t out_stride,
                                                       float* wbuf, float* xbuf) {
  const TX* xp = static_cast<const TX*>(x);
  const TW* wp = static_cast<const TW*>(w);
  TX* op = static_cast<TX*>(out);
  const TX* bp = static_cast<const TX*>(bias);
  for (int64_t j = n0; j < n1; j += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - j));
    for (int r = 0; r < rows; ++r) {
      const TW* src = wp + (j + r) * k;
      float* dst = wbuf + r * k;
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) dst[i] = to_float(src[i]);
    }
    for (int r = rows; r < kRows; ++r) std::fill(wbuf + r * k, wbuf + (r + 1) * k, 0.f);
    const float *w0 = wbuf, *w1 = wbuf + k, *w2 = wbuf + 2 * k, *w3 = wbuf + 3 * k;
    auto store = [&](int64_t m, const float* acc) {
      for (int r = 0; r < rows; ++r) {
        const float b = bp ? to_float(bp[j + r]) : 0.f;
        op[m * out_stride + j + r] = from_float<TX>(acc[r] + b);
      }
    };
    int64_t m = 0;
    for (; m + 2 <= m_rows; m += 2) {  // two input rows share each weight load
      const float* xa = xbuf + m * k;
      const float* xb = xa + k;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t i = 0; i < k; ++i) {
        a0 += xa[i] * w0[i];
        a1 += xa[i] * w1[i];
        a2 += xa[i] * w2[i];
        a3 += xa[i] * w3[i];
        b0 += xb[i] * w0[i];
        b1 += xb[i] * w1[i];
        b2 += xb[i] * w2[i];
        b3 += xb[i] * w3[i];
      }
      const float acc_a[kRows] = {a0, a1, a2, a3}, acc_b[kRows] = {b0, b1, b2, b3};
      store(m, acc_a);
      store(m + 1, acc_b);
    }
    for (; m < m_rows; ++m) {
      float acc[kRows];
      dot4(xbuf + m * k, wbuf, k, acc);
      store(m, acc);
    }
  }
  (void)n;
  (void)x_stride;
}

template <typename TX, typename TW>
__attribute__((always_inline)) inline void linear_typed(void* out, const void* x, const void* w,
                                                        const void* bias, int64_t m, int64_t k,
                                                        int64_t n, int64_t x_stride,
                                                        int64_t out_stride, int64_t n0, int64_t n1,
                                                        float* wbuf, float* xbuf) {
  linear_tile<TX, TW>(out, x, w, bias, m, k, n, n0, n1, x_stride, out_stride, wbuf, xbuf);
}

TM_MULTIVERSION void linear_range(DType xt, DType wt, void* out, const void* x, const void* w,
                                  const void* bias, int64_t m, int64_t k, int64_t n,
                                  int64_t x_stride, int64_t out_stride, int64_t n0, int64_t n1,
                                  float* wbuf, float* xbuf) {
  if (xt == DType::kFloat32 && wt == DType::kFloat32)
    linear_typed<float, float>(out, x, w, bias, m, k, n, x_stride, out_stride, n0, n1, wbuf, xbuf);
  else if (xt == DType::kBFloat16 && wt == DType::kBFloat16)
    linear_typed<bf16, bf16>(out, x, w, bias, m, k, n, x_stride, out_stride, n0, n1, wbuf, xbuf);
  else if (xt == DType::kFloat32 && wt == DType::kBFloat16)
    linear_typed<float, bf16>(out, x, w, bias, m, k, n, x_stride, out_stride, n0, n1, wbuf, xbuf);
#if defined(__FLT16_MAX__)
  else if (xt == DType::kFloat16 && wt == DType::kFloat16)
    linear_typed<f16, f16>(out, x, w, bias, m, k, n, x_stride, out_stride, n0, n1, wbuf, xbuf);
#endif
}

template <typename T>
void store_rows(void* out, const float* acc, const void* bias, int64_t m, int64_t n,
                int64_t stride) {
  T* op = static_cast<T*>(out);
  const T* bp = static_cast<const T*>(bias);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j)
      op[r * stride + j] = from_float<T>(acc[r * n + j] + (bp ? to_float(bp[j]) : 0.f));
}

void store_typed(DType dtype, void* out, const float* acc, const void* bias, int64_t m, int64_t n,
                 int64_t stride) {
  switch (dtype) {
    case DType::kFloat32:
      store_rows<float>(out, acc, bias, m, n, stride);
      break;
    case DType::kBFloat16:
      store_rows<bf16>(out, acc, bias, m, n, stride);
      break;
#if defined(__FLT16_MAX__)
    case DType::kFloat16:
      store_rows<f16>(out, acc, bias, m, n, stride);
      break;
#endif
  }
}

}  // namespace

void linear(DType x_dtype, DType w_dtype, void* out, const void* x, const void* weight,
            const void* bias, int64_t m, int64_t k, int64_t n, int64_t x_stride,
            int64_t out_stride) {
  std::vector<float> xbuf(static_cast<size_t>(m) * k);
  rows_to_float(x_dtype, xbuf.data(), x, m, k, x_stride, k);
  // Column chunks: a multiple of the tile, small enough to balance threads.
  const int64_t chunk = std::max<int64_t>(kRows, (n / 64 + kRows - 1) / kRows * kRows);
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (dense_gemv_supported(m, k, w_dtype)) {
    std::vector<float> acc(static_cast<size_t>(m) * n);
    dense_gemv_order_x(xbuf.data(), m, k, w_dtype);
    const DenseGemv a{acc.data(), xbuf.data(), weight, w_dtype, m, k, n};
    for_thread_ranges(n, [&](int64_t n0, int64_t n1) { dense_gemv(a, n0, n1); });
    store_typed(x_dtype, out, acc.data(), bias, m, n, out_stride);
    return;
  }
#pragma omp parallel
  {
    std::vector<float> wbuf(static_cast<size_t>(kRows) * k);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(n, n0 + chunk);
      linear_range(x_dtype, w_dtype, out, x, weight, bias, m, k, n, x_stride, out_stride, n0, n1,
                   wbuf.data(), xbuf.data());
    }
  }
}

namespace {

// One coded value (layout in kernels.h).
inline float coded_value(const CodedBf16& w, int64_t r, int64_t c) {
  const int code = (w.codes[r * (w.k / 2) + code_byte(c)] >> code_shift(c)) & 0x0f;
  return to_float(bf16{static_cast<uint16_t>(w.table[code] << 8 | w.low[r * w.k + c])});
}

// Columns n0..n1 without the fast path: each row decoded once for all m rows.
void coded_rows_portable(const CodedBf16& w, float* out, const float* x, int64_t m, int64_t n0,
                         int64_t n1) {
  std::vector<float> row(static_cast<size_t>(w.k));
  for (int64_t j = n0; j < n1; ++j) {
    for (int64_t c = 0; c < w.k; ++c) row[c] = coded_value(w, j, c);
    for (int64_t i = 0; i < m; ++i) {
      float total = 0.f;
      for (int64_t c = 0; c < w.k; ++c) total += row[c] * x[i * w.k + c];
      out[i * w.n + j] = total;
    }
  }
}

}  // namespace

void code_bf16(const uint16_t* w, int64_t n, int64_t k, const uint8_t* table, uint8_t* low,
               uint8_t* codes, int32_t* escape_offsets, int32_t* escape_cols,
               float* escape_values) {
  if (k % 64 != 0) throw std::invalid_argument("coded weights need k to be a multiple of 64");
  if (table[0] != 0) throw std::invalid_argument("a code table starts with 0");
  int code_of[256];
  std::fill(code_of, code_of + 256, -1);
  for (int c = 15; c >= 0; --c) code_of[table[c]] = c;
  const bool listing = escape_cols != nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    int32_t escapes = 0;
    for (int64_t c = 0; c < k; ++c) {
      const uint16_t bits = w[r * k + c];
      const int code = code_of[bits >> 8];
      if (listing) {
        if (code < 0) {
          const int32_t e = escape_offsets[r] + escapes;
          escape_cols[e] = static_cast<int32_t>(c);
          escape_values[e] = to_float(bf16{bits});
        }
      } else {
        low[r * k + c] = code < 0 ? 0 : static_cast<uint8_t>(bits & 0xff);
        uint8_t& byte = codes[r * (k / 2) + code_byte(c)];
        const uint8_t nibble = static_cast<uint8_t>(code < 0 ? 0 : code);
        // The first nibble of a byte sets it (codes arrive uninitialised).
        byte = code_shift(c) == 0 ? nibble : static_cast<uint8_t>(byte | nibble << code_shift(c));
      }
      escapes += code < 0;
    }
    if (!listing) escape_offsets[r + 1] = escapes;
  }
  if (listing) return;
  escape_offsets[0] = 0;
  for (int64_t r = 0; r < n; ++r) escape_offsets[r + 1] += escape_offsets[r];
}

void coded_linear(DType x_dtype, void* out, const void* x, const CodedBf16& w, const void* bias,
                  int64_t m, int64_t x_stride, int64_t out_stride) {
  if (w.k % 64 != 0) throw std::invalid_argument("coded weights need k to be a multiple of 64");
  std::vector<float> xbuf(static_cast<size_t>(m) * w.k), acc(static_cast<size_t>(m) * w.n);
  rows_to_float(x_dtype, xbuf.data(), x, m, w.k, x_stride, w.k);
  std::vector<float> ordered;
  if (coded_gemv_supported(m)) {
    ordered.resize(xbuf.size());
    coded_gemv_order_x(ordered.data(), xbuf.data(), m, w.k);
  }
  for_thread_ranges(w.n, [&](int64_t n0, int64_t n1) {
    if (ordered.empty())
      coded_rows_portable(w, acc.data(), xbuf.data(), m, n0, n1);
    else
      coded_gemv(w, acc.data(), ordered.data(), m, n0, n1);
    for (int64_t j = n0; j < n1; ++j)
      for (int32_t e = w.escape_offsets[j]; e < w.escape_offsets[j + 1]; ++e)
        for (int64_t i = 0; i < m; ++i)
          acc[i * w.n + j] += w.escape_values[e] * xbuf[i * w.k + w.escape_cols[e]];
  });
  store_typed(x_dtype, out, acc.data(), bias, m, w.n, out_stride);
}

}  // namespace tokenmill::cpu
