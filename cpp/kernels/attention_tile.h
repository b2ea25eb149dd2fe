// The inner products of a prefill tile of paged attention (see
// attention.cpp), with AVX2 + FMA versions picked at run time, and whole
// bfloat16 tiles on CPUs with AVX-512 bfloat16 dot products.
#pragma once

#include <cstdint>
#include <vector>

#include "tokenmill/kernels.h"

namespace tokenmill::cpu {

// s[r * s_stride + t] = q[r] . k[t] for `rows` query rows and n <= s_stride
// keys of head size D; columns up to s_stride may be overwritten. kt is
// scratch for D * s_stride floats.
void tile_scores(const float* q, int rows, int D, const float* k, int n, float* s, int s_stride,
                 float* kt);
// acc[r] += sum_t s[r * s_stride + t] * v[t] for `rows` rows of head size D.
void tile_values(const float* s, int s_stride, int rows, const float* v, int n, int D, float* acc);

// Per-thread buffers of prefill_tile_bf16: the query as pairs of head dims by
// row, each row's position, running max, sum and rescale factor, the scores
// and weights of one block (by key, then row), its values as key pairs, and
// the output accumulators.
struct Bf16TileScratch {
  std::vector<uint32_t> qp, pp, vp;
  std::vector<int32_t> pos;
  std::vector<float> m, l, corr, s, acc;
};

// Whether this CPU and these parameters can take prefill_tile_bf16.
bool prefill_tile_bf16_supported(const PagedAttentionParams& p);
// Query rows [q_begin, q_end) of sequence `seq` against KV head `kvh`, into
// the output (see attention_tile_avx512.cpp).
void prefill_tile_bf16(const PagedAttentionParams& p, int seq, int kvh, int q_begin, int q_end,
                       Bf16TileScratch& w);

}  // namespace tokenmill::cpu
