// The decode fast path of paged attention (see attention_decode_avx2.cpp).
#pragma once

#include <vector>

#include "tokenmill/kernels.h"

namespace tokenmill::cpu {

constexpr int kMaxDecodeBlock = 32;
// Keys a decode item scores before it updates its softmax and reads values.
constexpr int kRoundTokens = 256;

// The unnormalised softmax state of one decode item over (part of) its
// context: running max and sum per head and the weighted sum of values.
struct DecodePartial {
  float m[8], l[8];
  alignas(32) float acc[8 * 128];
};

// Per-thread buffers: an item's query rows, head states and the scores of
// one round.
struct DecodeScratch {
  std::vector<float> q, s;
  std::vector<DecodePartial> states;
};

// Whether this CPU and these parameters can take the fast path.
bool decode_fast_path_supported(const PagedAttentionParams& p);
// Attends sequence `seq`'s single query token for KV heads [kvh0, kvh1) over
// the KV blocks [block_begin, block_end): into the output when `partial` is
// null, else (one head) into `partial` for decode_merge.
bool decode_fast_path(const PagedAttentionParams& p, int seq, int kvh0, int kvh1, int block_begin,
                      int block_end, DecodeScratch& w, DecodePartial* partial);
// Combines the partial states of one item over consecutive context parts and
// writes its output.
void decode_merge(const PagedAttentionParams& p, int seq, int kvh, const DecodePartial* parts,
                  int count);

}  // namespace tokenmill::cpu
