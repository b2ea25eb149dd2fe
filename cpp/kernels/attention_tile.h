// The inner products of a prefill tile of paged attention (see
// attention.cpp), with AVX2 + FMA versions picked at run time.
#pragma once

namespace tokenmill::cpu {

// s[r * s_stride + t] = q[r] . k[t] for `rows` query rows and n <= s_stride
// keys of head size D; columns up to s_stride may be overwritten. kt is
// scratch for D * s_stride floats.
void tile_scores(const float* q, int rows, int D, const float* k, int n, float* s, int s_stride,
                 float* kt);
// acc[r] += sum_t s[r * s_stride + t] * v[t] for `rows` rows of head size D.
void tile_values(const float* s, int s_stride, int rows, const float* v, int n, int D, float* acc);

}  // namespace tokenmill::cpu
