// The inner products of a prefill tile of paged attention (see
// attention.cpp), with AVX2 + FMA versions picked at run time, and whole
// bfloat16 tiles on CPUs with AVX-512 bfloat16 dot products.
#pragma once

#include <algorithm>
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

// The KV blocks that query rows [q_begin, q_end) of a sequence read for one
// KV head: from the block of the sliding window's first key to that of the
// rows' last position.
struct TileBlocks {
  int first, end, last_pos, block_size;
  const int32_t* table;
  int64_t block_elems, head_offset;

  // Where block b's rows for the KV head start in either cache (elements).
  int64_t offset(int b) const { return table[b] * block_elems + head_offset; }
  // Keys of block b up to the last position.
  int rows(int b) const { return std::min(block_size, last_pos + 1 - b * block_size); }
};

inline TileBlocks tile_blocks(const PagedAttentionParams& p, int seq, int kvh, int q_begin,
                              int q_end) {
  const int bs = p.block_size;
  const int first_pos = p.seq_lens[seq] - (p.query_start_loc[seq + 1] - p.query_start_loc[seq]);
  const int last_pos = first_pos + q_end - 1;
  const int lo = p.sliding_window > 0 ? std::max(0, first_pos + q_begin - p.sliding_window + 1) : 0;
  const int64_t head_elems = static_cast<int64_t>(bs) * p.head_size;
  return {lo / bs,
          last_pos / bs + 1,
          last_pos,
          bs,
          p.block_tables + seq * p.block_table_stride,
          p.num_kv_heads * head_elems,
          kvh * head_elems};
}

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
