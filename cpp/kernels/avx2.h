// AVX2 + FMA helpers shared by the hand-vectorised kernels. Each function
// carries its own target attribute, so including files compile for the
// baseline ISA and call these only after checking the CPU at run time.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdlib>

#include "common.h"

namespace tokenmill::cpu {

#define TM_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

TM_AVX2 __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// Eight bfloat16 values widened to float32: the upper half of each lane.
TM_AVX2 __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Eight float32 lanes stored as bfloat16, rounded to nearest even (NaN
// stays NaN): the vector form of from_float<bf16>.
TM_AVX2 void store8(bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
TM_AVX2 void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

TM_AVX2 float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

TM_AVX2 float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp of eight lanes: the arithmetic of fast_exp (common.h), vectorised.
TM_AVX2 __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(exp_coef::kLo);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(exp_coef::kHi));
  const __m256 magic = _mm256_set1_ps(exp_coef::kRound);
  const __m256 n =
      _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(exp_coef::kLog2e), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(exp_coef::kLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(exp_coef::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(exp_coef::kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_coef::kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_coef::kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_coef::kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_coef::kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_coef::kP5));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

// Whether to take the hand-vectorised paths. TOKENMILL_DISABLE_AVX2=1 turns
// them off, so the portable paths that other CPUs run can be tested here.
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("TOKENMILL_DISABLE_AVX2") == nullptr;
  return ok;
}

}  // namespace tokenmill::cpu
#endif
