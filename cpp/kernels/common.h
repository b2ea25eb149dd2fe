// Element conversions and instruction-set dispatch shared by the CPU kernels.
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "tokenmill/kernels.h"

// Hot per-item functions are compiled for several x86 levels and picked at
// load time; other CPUs get the portable build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TOKENMILL_NO_CLONES)
#define TM_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TM_MULTIVERSION
#endif

namespace tokenmill::cpu {

struct bf16 {
  uint16_t bits;
};

#if defined(__FLT16_MAX__)
using f16 = _Float16;
#else
struct f16 {
  uint16_t bits;
};
#endif

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline bf16 from_float<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{static_cast<uint16_t>(nan ? 0x7fc0u : rounded)};
}

#if defined(__FLT16_MAX__)
inline float to_float(f16 x) { return static_cast<float>(x); }
template <>
inline f16 from_float<f16>(float x) {
  return static_cast<f16>(x);
}
#endif

// The constants of fast_exp and of its vector forms (exp8 in avx2.h, exp16
// in avx512.h): x is clamped to [kLo, kHi], n = round(x * log2(e)) (by adding
// and removing 1.5 * 2^23), r = x - n * ln(2) with ln(2) in two parts, and
// exp(x) = 2^n * (1 + r + r^2 * p(r)) with p of degree five.
namespace exp_coef {
constexpr float kLo = -87.f, kHi = 88.f;
constexpr float kRound = 12582912.f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = 2.12194440e-4f;  // ln(2) = kLn2Hi - kLn2Lo
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace exp_coef

// exp(x) for float, accurate to a few ulp over the range softmax and SiLU
// use, written without branches or calls so that loops over it vectorize
// (with -fno-trapping-math). Inputs below -87 (including -inf) give 0.
__attribute__((always_inline)) inline float fast_exp(float x) {
  using namespace exp_coef;
  const float keep = x > kLo ? 1.f : 0.f;
  x = x < kLo ? kLo : x;
  x = x > kHi ? kHi : x;
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = x - n * kLn2Hi + n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale * keep;
}

// acc[r] = x . w_r for four contiguous float rows w_0..w_3 of length k: the
// inner loop of the portable tile kernels (linear.cpp, int4.cpp).
__attribute__((always_inline)) inline void dot4(const float* x, const float* w, int64_t k,
                                                float acc[4]) {
  const float *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < k; ++i) {
    a0 += x[i] * w0[i];
    a1 += x[i] * w1[i];
    a2 += x[i] * w2[i];
    a3 += x[i] * w3[i];
  }
  acc[0] = a0;
  acc[1] = a1;
  acc[2] = a2;
  acc[3] = a3;
}

template <typename T>
inline void load_float(float* dst, const T* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void store_float(T* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// Calls fn with a value of the element type named by dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(float{});
      break;
    case DType::kBFloat16:
      fn(bf16{});
      break;
#if defined(__FLT16_MAX__)
    case DType::kFloat16:
      fn(f16{});
      break;
#endif
    default:
      throw std::invalid_argument("unsupported dtype on this CPU");
  }
}

// Bytes per element of dtype (rejecting dtypes this CPU lacks).
inline int64_t dtype_size(DType dtype) {
  int64_t size = 0;
  dispatch_dtype(dtype, [&](auto t) { size = sizeof(t); });
  return size;
}

// Calls fn(n0, n1) once on each thread with its share of [0, n) as one
// contiguous range: a thread then streams one long run of memory, which the
// hardware prefetcher follows, rather than chunks scattered over the whole.
template <typename Fn>
void for_thread_ranges(int64_t n, Fn&& fn) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    fn(n * t / threads, n * (t + 1) / threads);
  }
}

// Rows [n0, n1) of a weight as R long runs read side by side: tile(R, j,
// stride) for rows j, j + stride, ... of the runs, then tile(1, j, 1) for
// the rows left over, with R as a std::integral_constant. R sequential
// streams keep more loads in flight than one (3072 x 576 bf16 weights on a
// Zen 3: 22 against 18 GB/s, a plain read's speed), and long runs, unlike R
// adjacent rows, let the hardware prefetcher follow each stream.
template <int R, typename Tile>
void for_row_runs(int64_t n0, int64_t n1, Tile&& tile) {
  const int64_t run = (n1 - n0) / R;
  for (int64_t j = n0; j < n0 + run; ++j) tile(std::integral_constant<int, R>{}, j, run);
  for (int64_t j = n0 + R * run; j < n1; ++j) tile(std::integral_constant<int, 1>{}, j, 1);
}

// Input rows [0, m) in chunks against one tile of R weight rows:
// chunk(M, i) for rows i .. i + M - 1, with M as a std::integral_constant.
// Chunks of up to four, or two against tiles of more than two rows, keep a
// tile's R x M accumulators within eight registers.
template <int R, typename Chunk>
void for_input_chunks(int64_t m, Chunk&& chunk) {
  constexpr int kMax = R > 2 ? 2 : 4;
  int64_t i = 0;
  for (; i + kMax <= m; i += kMax) chunk(std::integral_constant<int, kMax>{}, i);
  const int64_t left = m - i;
  if constexpr (kMax == 4) {
    if (left == 3) return chunk(std::integral_constant<int, 3>{}, i);
    if (left == 2) return chunk(std::integral_constant<int, 2>{}, i);
  }
  if (left == 1) chunk(std::integral_constant<int, 1>{}, i);
}

}  // namespace tokenmill::cpu
