// Element conversions and instruction-set dispatch shared by the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "tokenmill/kernels.h"

// Hot per-item functions are compiled for several x86 levels and picked at
// load time; other CPUs get the portable build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(TOKENMILL_NO_CLONES)
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
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16 from_float<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

#if defined(__FLT16_MAX__)
inline float to_float(f16 x) { return static_cast<float>(x); }
template <>
inline f16 from_float<f16>(float x) { return static_cast<f16>(x); }
#endif

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
    case DType::kFloat32: fn(float{}); break;
    case DType::kBFloat16: fn(bf16{}); break;
#if defined(__FLT16_MAX__)
    case DType::kFloat16: fn(f16{}); break;
#endif
    default: throw std::invalid_argument("unsupported dtype on this CPU");
  }
}

}  // namespace tokenmill::cpu
