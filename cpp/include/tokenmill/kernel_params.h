// Parameters shared by the CPU kernels and the GPU launchers. The KV cache
// layout is [num_blocks, num_kv_heads, block_size, head_size] for keys and
// values alike.
#pragma once

#include <cstdint>

namespace tokenmill {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// GGUF block formats, by ggml's type numbers.
enum class GgufType {
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14
};

// The bytes of one block of a GGUF type as the file stores it (32 weights;
// 256 for the K types), 0 for a type tokenmill does not read.
constexpr int64_t gguf_block_bytes(GgufType t) {
  switch (t) {
    case GgufType::kQ4_0:
      return 18;
    case GgufType::kQ4_1:
      return 20;
    case GgufType::kQ5_0:
      return 22;
    case GgufType::kQ5_1:
      return 24;
    case GgufType::kQ8_0:
      return 34;
    case GgufType::kQ4_K:
      return 144;
    case GgufType::kQ5_K:
      return 176;
    case GgufType::kQ6_K:
      return 210;
  }
  return 0;
}
constexpr int64_t gguf_block_weights(GgufType t) {
  return t == GgufType::kQ4_K || t == GgufType::kQ5_K || t == GgufType::kQ6_K ? 256 : 32;
}

// A [rows, heads, dim] view whose last dimension is contiguous.
struct View3 {
  void* data;
  int64_t row_stride;
  int64_t head_stride;
};

struct PagedAttentionParams {
  DType dtype;
  View3 out;    // [num_tokens, num_heads, head_size]
  View3 query;  // [num_tokens, num_heads, head_size]
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;  // [num_seqs, block_table_stride]
  int64_t block_table_stride;
  const int32_t* seq_lens;         // [num_seqs] context length incl. new
  const int32_t* query_start_loc;  // [num_seqs + 1]
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int block_size;
  float scale;
  int sliding_window = 0;               // 0: attend to the whole context
  float softcap = 0.f;                  // 0: none
  const float* alibi_slopes = nullptr;  // [num_heads] or null
  // [num_heads] or null: a learned logit per head that joins each softmax's
  // denominator without a value (GPT-OSS's attention sinks).
  const float* sinks = nullptr;
  // The first num_decode_seqs sequences decode: a token, perhaps with draft
  // tokens after it. Each of their query tokens is attended as a decode step
  // attends its one token, so verifying drafts changes no token's output.
  int num_decode_seqs = 0;
};

enum class Activation { kSilu, kGeluExact, kGeluTanh };

// A mixture-of-experts MLP: out[t] = sum_j topk_weights[t, j] *
// (w2[e] act(w13[e] x[t] + b13[e]) + b2[e]) with e = topk_ids[t, j]. w13 is
// [num_experts, 2 * inter, hidden] (gate rows, then up rows), w2 [num_experts,
// hidden, inter], both contiguous; x and out are [num_tokens, hidden] rows at
// their strides; the optional biases are float32.
struct MoeParams {
  DType x_dtype, w_dtype;
  void* out;
  const void* x;
  int64_t out_stride, x_stride;
  const void* w13;
  const void* w2;
  const float* b13 = nullptr;  // [num_experts, 2 * inter] or null
  const float* b2 = nullptr;   // [num_experts, hidden] or null
  const float* topk_weights;   // [num_tokens, top_k]
  const int32_t* topk_ids;     // [num_tokens, top_k]
  int64_t num_tokens, top_k, num_experts, hidden, inter;
  Activation act;
  // GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)
  // with g = min(gate, limit), in place of act when limit > 0.
  float swiglu_alpha = 0.f, swiglu_limit = 0.f;
};

}  // namespace tokenmill
