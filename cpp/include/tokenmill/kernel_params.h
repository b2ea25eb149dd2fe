// Parameters shared by the CPU kernels and the GPU launchers. The KV cache
// layout is [num_blocks, num_kv_heads, block_size, head_size] for keys and
// values alike.
#pragma once

#include <cstdint>

namespace tokenmill {

enum class DType { kFloat32, kBFloat16, kFloat16 };

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
};

enum class Activation { kSilu, kGeluExact, kGeluTanh };

}  // namespace tokenmill
