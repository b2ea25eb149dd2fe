// The decode fast path of paged attention (see attention_decode_avx2.cpp).
#pragma once

#include "tokenmill/kernels.h"

namespace tokenmill::cpu {

constexpr int kMaxDecodeBlock = 32;

// Per-thread buffers: query rows, scores and accumulators of one item.
struct DecodeScratch {
  alignas(32) float q[8 * 128];
  alignas(32) float s[8 * kMaxDecodeBlock];
  alignas(32) float acc[8 * 128];
};

// Whether this CPU and these parameters can take the fast path.
bool decode_fast_path_supported(const PagedAttentionParams& p);
// Attends sequence `seq`'s single query token for KV head `kvh`.
bool decode_fast_path(const PagedAttentionParams& p, int seq, int kvh, DecodeScratch& w);

}  // namespace tokenmill::cpu
