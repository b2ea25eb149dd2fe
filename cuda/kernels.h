// GPU launchers on raw device pointers and a stream. They take the
// parameters of the CPU kernels (cpp/include/tokenmill/kernels.h) plus the
// stream, and return an error string or nullptr.
#pragma once

#include <cstdint>

#include "tokenmill/kernel_params.h"

namespace tokenmill::gpu {

const char* reshape_and_cache(DType dtype, View3 key, View3 value, void* key_cache,
                              void* value_cache, const int32_t* slot_mapping, int64_t num_tokens,
                              int num_kv_heads, int head_size, int block_size, void* stream);

// Long contexts with few query tokens split across thread blocks; the caller
// asks how many splits to use and provides a float32 workspace that large.
int paged_attention_splits(const PagedAttentionParams& p, int64_t num_tokens);
int64_t paged_attention_workspace_floats(const PagedAttentionParams& p, int64_t num_tokens,
                                         int splits);
const char* paged_attention(const PagedAttentionParams& p, int64_t num_tokens, int splits,
                            float* workspace, void* stream);
// Batches with prefill in 16-bit types on tensor cores (prefill_attention_kernels.cu);
// paged_attention takes this path itself wherever it fits.
bool prefill_attention_fits(const PagedAttentionParams& p, int64_t num_tokens);
const char* prefill_attention(const PagedAttentionParams& p, int64_t num_tokens, void* stream);

const char* rms_norm(DType dtype, View3 out, View3 x, const void* weight, int64_t rows,
                     int64_t heads, int64_t dim, float eps, void* stream);
const char* fused_add_rms_norm(DType dtype, void* x, void* residual, const void* weight,
                               int64_t rows, int64_t dim, int64_t x_stride, int64_t residual_stride,
                               float eps, void* stream);

const char* rotary_embedding(DType dtype, const int32_t* positions, int64_t num_tokens, View3 query,
                             int num_heads, View3 key, int num_kv_heads, int head_size,
                             const float* cos_sin_cache, int rot_dim, bool is_neox, void* stream);

const char* act_and_mul(DType dtype, Activation act, void* out, const void* x, int64_t rows,
                        int64_t d, int64_t x_stride, int64_t out_stride, void* stream);

// Weight-only int4 in tokenmill's layout (cpp/kernels/int4.cpp): x [m, k]
// (k <= k_padded) and out [m, n] in dtype, rows at the given strides.
const char* int4_linear(DType dtype, void* out, const void* x, int64_t m, int64_t k,
                        int64_t x_stride, int64_t out_stride, const uint8_t* qweight,
                        const float* scales, const float* zeros, int64_t k_padded, int64_t n,
                        int64_t group_size, void* stream);
// Rows n0..n1 of the dequantized weight, float32 [n1 - n0, k_padded].
const char* int4_dequantize(float* out, const uint8_t* qweight, const float* scales,
                            const float* zeros, int64_t k_padded, int64_t group_size, int64_t n0,
                            int64_t n1, void* stream);

// GGUF block weights in the file's layout (cuda/gguf_kernels.cu): rows of
// row_bytes bytes (gguf_row_bytes). gguf_linear: x [m, k] and out [m, n] in
// dtype; gguf_dequantize: rows n0..n1 into out [n1 - n0, k] in dtype.
int64_t gguf_row_bytes(int64_t ggml_type, int64_t k);  // 0: not a supported type
const char* gguf_linear(DType dtype, void* out, const void* x, int64_t m, int64_t k,
                        int64_t x_stride, int64_t out_stride, const uint8_t* qweight,
                        int64_t ggml_type, int64_t row_bytes, int64_t n, void* stream);
const char* gguf_dequantize(DType dtype, void* out, const uint8_t* qweight, int64_t ggml_type,
                            int64_t row_bytes, int64_t k, int64_t n0, int64_t n1, void* stream);

// The MoE MLP (kernel_params.h); the workspace holds
// fused_moe_workspace_floats(p) floats.
int64_t fused_moe_workspace_floats(const MoeParams& p);
const char* fused_moe(const MoeParams& p, float* workspace, void* stream);

}  // namespace tokenmill::gpu
