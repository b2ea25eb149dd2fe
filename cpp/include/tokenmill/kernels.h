// CPU kernels on raw pointers and strides, callable without torch. The CUDA
// launchers (cuda/kernels.h) take the same parameters plus a stream.
#pragma once

#include <cstdint>

#include "tokenmill/kernel_params.h"

namespace tokenmill::cpu {

void reshape_and_cache(DType dtype, View3 key, View3 value, void* key_cache, void* value_cache,
                       const int32_t* slot_mapping, int64_t num_tokens, int num_kv_heads,
                       int head_size, int block_size);

// Causal attention of each sequence's new query tokens (the last tokens of
// its context) over its paged context. Prefill, chunked prefill and decode
// mix freely in one call.
void paged_attention(const PagedAttentionParams& p);

// Each of the rows x heads vectors of x [rows, heads, dim] normalised over dim
// (heads = 1 for plain rows; q/k norms take the heads of a fused QKV output).
void rms_norm(DType dtype, View3 out, View3 x, const void* weight, int64_t rows, int64_t heads,
              int64_t dim, float eps);
// residual += x; x = rms_norm(residual)
void fused_add_rms_norm(DType dtype, void* x, void* residual, const void* weight, int64_t rows,
                        int64_t dim, int64_t x_stride, int64_t residual_stride, float eps);

// In place on query [tokens, heads, head_size] and key; rot_dim leading
// dims rotate. cos_sin_cache is float32 [max_position, rot_dim] (cos, sin).
void rotary_embedding(DType dtype, const int32_t* positions, int64_t num_tokens, View3 query,
                      int num_heads, View3 key, int num_kv_heads, int head_size,
                      const float* cos_sin_cache, int rot_dim, bool is_neox);

// out[t, :d] = act(x[t, :d]) * x[t, d:2d]
void act_and_mul(DType dtype, Activation act, void* out, const void* x, int64_t rows, int64_t d,
                 int64_t x_stride, int64_t out_stride);

// out[m, n] = x[m, :] . weight[n, :] (+ bias[n]) for few rows m, reading the
// weight once. x, out and bias share a dtype; weight may be bfloat16 under
// float32 activations.
void linear(DType x_dtype, DType w_dtype, void* out, const void* x, const void* weight,
            const void* bias, int64_t m, int64_t k, int64_t n, int64_t x_stride,
            int64_t out_stride);

// A bfloat16 weight [n, k] (k a multiple of 64) in 12 bits a value, exactly:
// value w[r, c] has bits (table[code] << 8) | low[r, c], where code is the low
// nibble of codes[r, c / 64 * 32 + c % 32] for c % 64 < 32, else its high
// nibble. A high byte (sign and upper exponent bits) missing from the table
// is coded 0 with low byte 0, table[0] being 0 so that it reads +0, and its
// value is listed: escape_values[e] at column escape_cols[e] for e in
// [escape_offsets[r], escape_offsets[r + 1]). Trained weights need few
// escapes: their high bytes concentrate on a few exponents.
struct CodedBf16 {
  const uint8_t* low;             // [n, k]
  const uint8_t* codes;           // [n, k / 2]
  const uint8_t* table;           // [16]
  const int32_t* escape_offsets;  // [n + 1]
  const int32_t* escape_cols;
  const float* escape_values;
  int64_t n, k;
};

// Codes the bfloat16 bits w [n, k] by `table` into low, codes and
// escape_offsets; a second call with escape_offsets filled and escape_cols
// and escape_values given (room for escape_offsets[n]) lists the escapes.
void code_bf16(const uint16_t* w, int64_t n, int64_t k, const uint8_t* table, uint8_t* low,
               uint8_t* codes, int32_t* escape_offsets, int32_t* escape_cols, float* escape_values);

// out[m, n] = x[m, :] . w[n, :] (+ bias[n]), reading three quarters of the
// bytes a bfloat16 weight takes. x, out and bias share a dtype.
void coded_linear(DType x_dtype, void* out, const void* x, const CodedBf16& w, const void* bias,
                  int64_t m, int64_t x_stride, int64_t out_stride);

// The MoE MLP of kernel_params.h for float32 or bfloat16 weights. Tokens are
// grouped by expert and each routed expert's weights are read once for all of
// its tokens; experts no token routes to are not read. With coded copies of
// the bfloat16 weights (w13 as [experts * 2 * inter, hidden], w2 as [experts *
// hidden, inter]) it reads those instead.
void fused_moe(const MoeParams& p, const CodedBf16* w13_coded = nullptr,
               const CodedBf16* w2_coded = nullptr);

// The greedy token of one hidden state x[k] over an LM head weight[v, k]
// (bfloat16 or float32): the first index of the largest x . weight[r]
// rounded to x_dtype, exactly as linear() and an argmax would pick it, while
// reading an int8 copy q[v, k] (row scales `scales`) in place of the weight
// for all but the few rows that could win. bounds[r] must bound
// |x . weight[r] - scales[r] * (x . q[r])| / |x| (with room for float
// rounding). Returns -1 where this CPU has no fast path or x is not finite.
int64_t greedy_head(DType x_dtype, DType w_dtype, const void* x, const void* weight,
                    const int8_t* q, const float* scales, const float* bounds, int64_t k,
                    int64_t v);

// out[r] = the first index of the maximum of x[r, :n] (rows `stride` apart),
// a NaN counting as larger than any number, as torch.argmax has it.
void argmax_rows(DType dtype, int64_t* out, const void* x, int64_t m, int64_t n, int64_t stride);

// logits[r, t] = -inf for each r in rows[0..count) and token t < vocab whose
// bit (bit t % 32 of bitmask[r, t / 32], words a row) is clear.
void apply_token_bitmask(float* logits, int64_t stride, const int32_t* bitmask, int64_t words,
                         const int64_t* rows, int64_t count, int64_t vocab);

// A GGUF weight [n, k] (GgufType: kernel_params.h) stored as n rows of
// k / 32 blocks of row_bytes / (k / 32) bytes each.
struct GgufWeight {
  GgufType type;
  const uint8_t* data;
  int64_t row_bytes, n, k;
};
bool gguf_type_supported(int64_t ggml_type);
// Rows r0..r1 of the weight dequantized into out, float32 [r1 - r0, k].
void gguf_dequantize(const GgufWeight& w, float* out, int64_t r0, int64_t r1);
// out[m, n] = x[m, k] . dequant(w)^T for m <= 16 float32 rows, reading each block once,
// exactly (integer products: gguf_packed_linear).
void gguf_linear(const GgufWeight& w, const float* x, int64_t m, float* out);

// Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K weights repacked for integer
// products in groups of eight rows (layout in cpp/kernels/gguf_packed.h):
// ceil(n / 8) groups of gguf_packed_group_bytes(t, k) bytes, a GgufWeight with
// row_bytes that size. gguf_pack takes the legacy types; the K types are
// repacked by the loader (tokenmill.layers.gguf_linear).
bool gguf_packed_supported(int64_t ggml_type);
int64_t gguf_packed_group_bytes(GgufType t, int64_t k);
void gguf_pack(const GgufWeight& w, uint8_t* packed);
// out[m, n] = x[m, k] . dequant(w)^T for any m: with x quantized to int8 per 32
// values and integer dot products (llama.cpp's arithmetic) where the CPU has
// them (AVX2, AVX-512 VNNI), else exactly; with activation_bits 14, x is
// quantized to 14 bits instead (twice the multiply-adds, 64 times finer: for
// the logits). Rows of x and out have their own strides and float dtypes.
void gguf_packed_linear(const GgufWeight& w, DType x_dtype, const void* x, int64_t x_stride,
                        int64_t m, DType out_dtype, void* out, int64_t out_stride,
                        int activation_bits = 8);
// out[c, :] = dequantized row rows[c] of w, float32 [count, k]: embedding lookups.
void gguf_packed_rows(const GgufWeight& w, const int64_t* rows, int64_t count, float* out);

// Rows of a float dtype to float32 and back: dst[r, :k] for r < m.
void rows_to_float(DType dtype, float* dst, const void* src, int64_t m, int64_t k,
                   int64_t src_stride, int64_t dst_stride);
void rows_from_float(DType dtype, void* dst, const float* src, int64_t m, int64_t k,
                     int64_t dst_stride, int64_t src_stride);

// Weight-only int4 (layout in cpp/kernels/int4.cpp). out[m, n] = x[m, :] .
// dequant(w[n, :]) with x float32 [m, k_padded].
void int4_linear(float* out, const float* x, int64_t m, const uint8_t* qweight, const float* scales,
                 const float* zeros, int64_t k_padded, int64_t n, int64_t group_size);
// Rows n0..n1 of the dequantized weight into out, float32 [n1 - n0, k_padded].
void int4_dequantize(float* out, const uint8_t* qweight, const float* scales, const float* zeros,
                     int64_t k_padded, int64_t group_size, int64_t n0, int64_t n1);

}  // namespace tokenmill::cpu
