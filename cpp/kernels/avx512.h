// AVX-512 helpers for CPUs with bfloat16 dot products (avx512_bf16: Zen 4,
// Cooper Lake, Sapphire Rapids and later). As in avx2.h, each function carries
// its own target attribute and is called only after cpu_has_avx512_bf16().
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdlib>

#include "avx2.h"

namespace tokenmill::cpu {

#define TM_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"
#define TM_AVX512 __attribute__((target(TM_AVX512_TARGET), always_inline)) inline

// exp of sixteen lanes: the arithmetic of exp8 (avx2.h); NaN and -inf give 0.
TM_AVX512 __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(exp_coef::kLo);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(exp_coef::kHi));
  const __m512 magic = _mm512_set1_ps(exp_coef::kRound);
  const __m512 n =
      _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(exp_coef::kLog2e), magic), magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(exp_coef::kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(exp_coef::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(exp_coef::kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_coef::kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_coef::kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_coef::kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_coef::kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_coef::kP5));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(bits));
}

// Sixteen pairs (a[i], b[i]) of bfloat16 values as 32-bit words, a in the low
// half: the operand layout of vdpbf16ps.
TM_AVX512 __m512i pair16(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// Sixteen float32 lanes rounded to bfloat16 (nearest even).
TM_AVX512 __m256i to_bf16x16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// Sixteen values widened to float32, and stored back (bfloat16: rounded to
// nearest even): the sixteen-lane forms of load8 and store8 (avx2.h).
TM_AVX512 __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TM_AVX512 __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
TM_AVX512 void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
TM_AVX512 void store16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(v));
}

TM_AVX512 __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Whether to take the AVX-512 bfloat16 paths. TOKENMILL_DISABLE_AVX512=1 (or
// TOKENMILL_DISABLE_AVX2=1) turns them off, so that the AVX2 and portable
// paths stay tested on CPUs that have them.
inline bool cpu_has_avx512_bf16() {
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("TOKENMILL_DISABLE_AVX512") == nullptr;
  return ok;
}

}  // namespace tokenmill::cpu
#endif
