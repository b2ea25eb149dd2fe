// The torch.ops.tokenmill.* entry points, shared by every backend: argument
// checks and tensor-to-pointer plumbing live here once; a backend type B
// supplies the kernels (B::rms_norm(device_tensor, ...) and so on) with the
// signatures of tokenmill::cpu's, plus a leading tensor that tells it where
// to run.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <vector>

#include "tokenmill/kernel_params.h"

namespace tokenmill::ops {

using torch::stable::Tensor;

inline DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case torch::headeronly::ScalarType::Float:
      return DType::kFloat32;
    case torch::headeronly::ScalarType::BFloat16:
      return DType::kBFloat16;
    case torch::headeronly::ScalarType::Half:
      return DType::kFloat16;
    default:
      STD_TORCH_CHECK(false, "tokenmill ops take float32, bfloat16 or float16 tensors");
  }
  return DType::kFloat32;
}

inline void check_same_dtype(const Tensor& a, const Tensor& b, const char* what) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, " must have the dtype of the input");
}

inline void check_int32(const Tensor& t, const char* what) {
  STD_TORCH_CHECK(t.scalar_type() == torch::headeronly::ScalarType::Int && t.is_contiguous(), what,
                  " must be a contiguous int32 tensor");
}

// [tokens, heads, dim] or [tokens, heads * dim] with a contiguous last dim.
inline View3 view3(const Tensor& t, int64_t head_size) {
  STD_TORCH_CHECK(t.stride(t.dim() - 1) == 1, "last dimension must be contiguous");
  if (t.dim() == 3) return {t.data_ptr(), t.stride(0), t.stride(1)};
  STD_TORCH_CHECK(t.dim() == 2, "expected a 2-D or 3-D tensor");
  return {t.data_ptr(), t.stride(0), head_size};
}

inline int64_t heads_of(const Tensor& t, int64_t head_size) {
  return t.dim() == 3 ? t.size(1) : t.size(1) / head_size;
}

inline void check_int4(const Tensor& qweight, const Tensor& scales, const Tensor& zeros) {
  STD_TORCH_CHECK(qweight.scalar_type() == torch::headeronly::ScalarType::Byte &&
                      qweight.dim() == 2 && qweight.is_contiguous(),
                  "qweight must be a contiguous uint8 [N, K/2] tensor");
  for (const Tensor* t : {&scales, &zeros})
    STD_TORCH_CHECK(t->scalar_type() == torch::headeronly::ScalarType::Float &&
                        t->is_contiguous() && t->dim() == 2 && t->size(0) == qweight.size(0),
                    "scales and zeros must be contiguous float32 [N, groups]");
}

template <class B>
void reshape_and_cache(Tensor key, Tensor value, Tensor key_cache, Tensor value_cache,
                       Tensor slot_mapping) {
  check_int32(slot_mapping, "slot_mapping");
  check_same_dtype(key, key_cache, "key_cache");
  check_same_dtype(value, value_cache, "value_cache");
  STD_TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous(),
                  "caches must be contiguous [num_blocks, num_kv_heads, block_size, head_size]");
  const int64_t head_size = key_cache.size(3);
  B::reshape_and_cache(key, dtype_of(key), view3(key, head_size), view3(value, head_size),
                       key_cache.data_ptr(), value_cache.data_ptr(),
                       static_cast<const int32_t*>(slot_mapping.data_ptr()), slot_mapping.numel(),
                       key_cache.size(1), head_size, key_cache.size(2));
}

template <class B>
void paged_attention(Tensor out, Tensor query, Tensor key_cache, Tensor value_cache,
                     Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, double scale,
                     int64_t sliding_window, double softcap, std::optional<Tensor> alibi_slopes,
                     std::optional<Tensor> sinks, int64_t num_decode_seqs) {
  check_int32(block_tables, "block_tables");
  check_int32(seq_lens, "seq_lens");
  check_int32(query_start_loc, "query_start_loc");
  check_same_dtype(query, key_cache, "key_cache");
  check_same_dtype(query, out, "out");
  STD_TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous(),
                  "caches must be contiguous [num_blocks, num_kv_heads, block_size, head_size]");
  const int64_t head_size = key_cache.size(3);
  tokenmill::PagedAttentionParams p;
  p.dtype = dtype_of(query);
  p.out = view3(out, head_size);
  p.query = view3(query, head_size);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_tables = static_cast<const int32_t*>(block_tables.data_ptr());
  p.block_table_stride = block_tables.dim() == 2 ? block_tables.size(1) : 0;
  p.seq_lens = static_cast<const int32_t*>(seq_lens.data_ptr());
  p.query_start_loc = static_cast<const int32_t*>(query_start_loc.data_ptr());
  p.num_seqs = static_cast<int>(seq_lens.numel());
  STD_TORCH_CHECK(query_start_loc.numel() == p.num_seqs + 1,
                  "query_start_loc must have num_seqs + 1 entries");
  p.num_heads = static_cast<int>(heads_of(query, head_size));
  p.num_kv_heads = static_cast<int>(key_cache.size(1));
  p.head_size = static_cast<int>(head_size);
  p.block_size = static_cast<int>(key_cache.size(2));
  p.scale = static_cast<float>(scale);
  p.sliding_window = static_cast<int>(sliding_window);
  p.softcap = static_cast<float>(softcap);
  p.num_decode_seqs = static_cast<int>(num_decode_seqs);
  if (alibi_slopes.has_value()) {
    STD_TORCH_CHECK(alibi_slopes->scalar_type() == torch::headeronly::ScalarType::Float &&
                        alibi_slopes->numel() == p.num_heads,
                    "alibi_slopes must be float32 [num_heads]");
    p.alibi_slopes = static_cast<const float*>(alibi_slopes->data_ptr());
  }
  if (sinks.has_value()) {
    STD_TORCH_CHECK(sinks->scalar_type() == torch::headeronly::ScalarType::Float &&
                        sinks->is_contiguous() && sinks->numel() == p.num_heads,
                    "sinks must be contiguous float32 [num_heads]");
    p.sinks = static_cast<const float*>(sinks->data_ptr());
  }
  B::paged_attention(query, p);
}

template <class B>
void rms_norm(Tensor out, Tensor x, Tensor weight, double eps) {
  check_same_dtype(x, out, "out");
  check_same_dtype(x, weight, "weight");
  const int64_t dim = x.size(x.dim() - 1);
  STD_TORCH_CHECK(out.dim() == x.dim() && weight.numel() == dim && x.dim() <= 3 &&
                      x.stride(x.dim() - 1) == 1 && out.stride(out.dim() - 1) == 1,
                  "rms_norm expects x and out of one shape, [dim], [rows, dim] or "
                  "[rows, heads, dim], with a contiguous last dimension");
  for (int64_t d = 0; d < x.dim(); ++d)
    STD_TORCH_CHECK(out.size(d) == x.size(d), "rms_norm: out and x differ in shape");
  // [rows, heads, dim] as a view with its strides; fewer dims are one head per row.
  auto view = [&](const Tensor& t) -> View3 {
    if (t.dim() == 3) return {t.data_ptr(), t.stride(0), t.stride(1)};
    return {t.data_ptr(), t.dim() == 2 ? t.stride(0) : dim, dim};
  };
  const int64_t heads = x.dim() == 3 ? x.size(1) : 1;
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
  B::rms_norm(x, dtype_of(x), view(out), view(x), weight.data_ptr(), rows, heads, dim,
              static_cast<float>(eps));
}

template <class B>
void fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, double eps) {
  check_same_dtype(x, residual, "residual");
  check_same_dtype(x, weight, "weight");
  const int64_t dim = x.size(x.dim() - 1);
  STD_TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.numel() == dim,
                  "fused_add_rms_norm expects contiguous x and residual");
  B::fused_add_rms_norm(x, dtype_of(x), x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                        x.numel() / dim, dim, dim, dim, static_cast<float>(eps));
}

template <class B>
void rotary_embedding(Tensor positions, Tensor query, std::optional<Tensor> key, int64_t head_size,
                      Tensor cos_sin_cache, bool is_neox) {
  check_int32(positions, "positions");
  STD_TORCH_CHECK(cos_sin_cache.scalar_type() == torch::headeronly::ScalarType::Float &&
                      cos_sin_cache.is_contiguous() && cos_sin_cache.dim() == 2,
                  "cos_sin_cache must be a contiguous float32 [max_position, rot_dim] tensor");
  View3 k{nullptr, 0, 0};
  int nkv = 0;
  if (key.has_value()) {
    check_same_dtype(query, *key, "key");
    k = view3(*key, head_size);
    nkv = static_cast<int>(heads_of(*key, head_size));
  }
  B::rotary_embedding(
      query, dtype_of(query), static_cast<const int32_t*>(positions.data_ptr()), positions.numel(),
      view3(query, head_size), static_cast<int>(heads_of(query, head_size)), k, nkv,
      static_cast<int>(head_size), static_cast<const float*>(cos_sin_cache.data_ptr()),
      static_cast<int>(cos_sin_cache.size(1)), is_neox);
}

template <class B>
void act_and_mul(Tensor out, Tensor x, tokenmill::Activation act) {
  check_same_dtype(x, out, "out");
  const int64_t d = out.size(out.dim() - 1);
  STD_TORCH_CHECK(x.size(x.dim() - 1) == 2 * d, "x must have twice the last dimension of out");
  STD_TORCH_CHECK(x.stride(x.dim() - 1) == 1 && out.is_contiguous(),
                  "act_and_mul expects a contiguous last dimension");
  const int64_t rows = out.numel() / d;
  B::act_and_mul(x, dtype_of(x), act, out.data_ptr(), x.data_ptr(), rows, d,
                 x.dim() > 1 ? x.stride(x.dim() - 2) : 2 * d, d);
}

template <class B>
void silu_and_mul(Tensor out, Tensor x) {
  act_and_mul<B>(out, x, tokenmill::Activation::kSilu);
}

template <class B>
void gelu_and_mul(Tensor out, Tensor x, bool approximate_tanh) {
  act_and_mul<B>(
      out, x,
      approximate_tanh ? tokenmill::Activation::kGeluTanh : tokenmill::Activation::kGeluExact);
}

template <class B>
void linear(Tensor out, Tensor x, Tensor weight, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2, "linear takes 2-D tensors");
  STD_TORCH_CHECK(weight.is_contiguous() && x.stride(1) == 1 && out.stride(1) == 1,
                  "linear needs a contiguous weight and rows with a contiguous last dimension");
  check_same_dtype(x, out, "out");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  STD_TORCH_CHECK(weight.size(1) == k && out.size(0) == m && out.size(1) == n,
                  "linear: shape mismatch");
  const void* b = nullptr;
  if (bias.has_value()) {
    check_same_dtype(x, *bias, "bias");
    STD_TORCH_CHECK(bias->numel() == n, "bias must have one value per output");
    b = bias->data_ptr();
  }
  B::linear(x, dtype_of(x), dtype_of(weight), out.data_ptr(), x.data_ptr(), weight.data_ptr(), b, m,
            k, n, x.stride(0), out.stride(0));
}

// x [M, K <= K_padded] and out [M, N] with contiguous rows. Device backends
// take x and out of one dtype as they are. The host kernels take float32 x
// padded to K_padded and float32 out; the host backend (B::kHost) converts
// other dtypes and pads on the way, so a decode step needs no separate
// conversion ops around it.
template <class B>
void int4_linear(Tensor out, Tensor x, Tensor qweight, Tensor scales, Tensor zeros,
                 int64_t group_size) {
  check_int4(qweight, scales, zeros);
  const int64_t kp = qweight.size(1) * 2, n = qweight.size(0);
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) <= kp,
                  "x must be [M, K] with K <= K_padded and contiguous rows");
  STD_TORCH_CHECK(
      out.dim() == 2 && out.stride(1) == 1 && out.size(0) == x.size(0) && out.size(1) == n,
      "out must be [M, N] with contiguous rows");
  const int64_t m = x.size(0);
  const auto* q = static_cast<const uint8_t*>(qweight.data_ptr());
  const auto* s = static_cast<const float*>(scales.data_ptr());
  const auto* z = static_cast<const float*>(zeros.data_ptr());
  if constexpr (!B::kHost) {
    check_same_dtype(x, out, "out");
    B::int4_linear(x, dtype_of(x), out.data_ptr(), x.data_ptr(), m, x.size(1), x.stride(0),
                   out.stride(0), q, s, z, kp, n, group_size);
  } else {
    auto run = [&](float* o, const float* xf) {
      B::int4_linear(x, o, xf, m, q, s, z, kp, n, group_size);
    };
    const auto f32 = torch::headeronly::ScalarType::Float;
    if (x.scalar_type() == f32 && out.scalar_type() == f32 && x.is_contiguous() &&
        out.is_contiguous() && x.size(1) == kp) {
      run(static_cast<float*>(out.data_ptr()), static_cast<const float*>(x.data_ptr()));
      return;
    }
    std::vector<float> xf(static_cast<size_t>(m * kp), 0.f), of(static_cast<size_t>(m * n));
    B::rows_to_float(x, dtype_of(x), xf.data(), x.data_ptr(), m, x.size(1), x.stride(0), kp);
    run(of.data(), xf.data());
    B::rows_from_float(x, dtype_of(out), out.data_ptr(), of.data(), m, n, out.stride(0), n);
  }
}

template <class B>
void int4_dequantize(Tensor out, Tensor qweight, Tensor scales, Tensor zeros, int64_t group_size,
                     int64_t row_start) {
  check_int4(qweight, scales, zeros);
  const int64_t kp = qweight.size(1) * 2;
  STD_TORCH_CHECK(out.scalar_type() == torch::headeronly::ScalarType::Float &&
                      out.is_contiguous() && out.dim() == 2 && out.size(1) == kp &&
                      row_start >= 0 && row_start + out.size(0) <= qweight.size(0),
                  "out must be contiguous float32 [rows, K_padded] within the weight");
  B::int4_dequantize(
      qweight, static_cast<float*>(out.data_ptr()), static_cast<const uint8_t*>(qweight.data_ptr()),
      static_cast<const float*>(scales.data_ptr()), static_cast<const float*>(zeros.data_ptr()), kp,
      group_size, row_start, row_start + out.size(0));
}

// out, x [tokens, hidden]; w13 [experts, 2 * inter, hidden]; w2 [experts,
// hidden, inter]; topk_weights float32 and topk_ids int32 [tokens, top_k];
// activation: 0 SiLU, 1 GELU-tanh, 2 GPT-OSS's clamped SwiGLU (alpha, limit).
inline tokenmill::MoeParams moe_params(Tensor out, Tensor x, Tensor w13, Tensor w2,
                                       Tensor topk_weights, Tensor topk_ids, int64_t activation,
                                       std::optional<Tensor> w13_bias,
                                       std::optional<Tensor> w2_bias, double swiglu_alpha,
                                       double swiglu_limit) {
  STD_TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
                  "fused_moe: x and out must be 2-D with contiguous rows");
  check_same_dtype(x, out, "out");
  STD_TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous(),
                  "fused_moe: w13 and w2 must be contiguous 3-D tensors");
  STD_TORCH_CHECK(w13.scalar_type() == w2.scalar_type(), "fused_moe: w13 and w2 dtypes differ");
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = w13.size(0);
  const int64_t inter = w13.size(1) / 2;
  STD_TORCH_CHECK(w13.size(2) == hidden && w13.size(1) == 2 * inter && w2.size(0) == experts &&
                      w2.size(1) == hidden && w2.size(2) == inter && out.size(0) == tokens &&
                      out.size(1) == hidden,
                  "fused_moe: shape mismatch");
  check_int32(topk_ids, "topk_ids");
  STD_TORCH_CHECK(topk_weights.scalar_type() == torch::headeronly::ScalarType::Float &&
                      topk_weights.is_contiguous() && topk_weights.dim() == 2 &&
                      topk_ids.dim() == 2 && topk_weights.size(0) == tokens &&
                      topk_ids.size(0) == tokens && topk_ids.size(1) == topk_weights.size(1),
                  "fused_moe: topk_weights (float32) and topk_ids must be [tokens, top_k]");
  STD_TORCH_CHECK(activation >= 0 && activation <= 2, "fused_moe: unknown activation");
  auto bias = [](const std::optional<Tensor>& b, int64_t n) -> const float* {
    if (!b.has_value()) return nullptr;
    STD_TORCH_CHECK(b->scalar_type() == torch::headeronly::ScalarType::Float &&
                        b->is_contiguous() && b->numel() == n,
                    "fused_moe: biases must be contiguous float32 [experts, outputs]");
    return static_cast<const float*>(b->data_ptr());
  };
  tokenmill::MoeParams p{dtype_of(x),   dtype_of(w13), out.data_ptr(), x.data_ptr(),
                         out.stride(0), x.stride(0),   w13.data_ptr(), w2.data_ptr()};
  p.b13 = bias(w13_bias, experts * 2 * inter);
  p.b2 = bias(w2_bias, experts * hidden);
  p.topk_weights = static_cast<const float*>(topk_weights.data_ptr());
  p.topk_ids = static_cast<const int32_t*>(topk_ids.data_ptr());
  p.num_tokens = tokens;
  p.top_k = topk_ids.size(1);
  p.num_experts = experts;
  p.hidden = hidden;
  p.inter = inter;
  p.act = activation == 1 ? tokenmill::Activation::kGeluTanh : tokenmill::Activation::kSilu;
  if (activation == 2) {
    p.swiglu_alpha = static_cast<float>(swiglu_alpha);
    p.swiglu_limit = static_cast<float>(swiglu_limit);
    STD_TORCH_CHECK(p.swiglu_limit > 0.f, "fused_moe: the clamped SwiGLU needs a limit > 0");
  }
  return p;
}

template <class B>
void fused_moe(Tensor out, Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids,
               int64_t activation, std::optional<Tensor> w13_bias, std::optional<Tensor> w2_bias,
               double swiglu_alpha, double swiglu_limit) {
  const tokenmill::MoeParams p = moe_params(out, x, w13, w2, topk_weights, topk_ids, activation,
                                            w13_bias, w2_bias, swiglu_alpha, swiglu_limit);
  if (p.num_tokens > 0) B::fused_moe(x, p);
}

// The schemas of every op; a library defines them once per namespace.
inline void define_ops(torch::stable::detail::StableLibrary& m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, "
      "int sliding_window=0, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None, "
      "int num_decode_seqs=0) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
      "Tensor cos_sin_cache, bool is_neox) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("gelu_and_mul(Tensor(a!) out, Tensor x, bool approximate_tanh=False) -> ()");
  m.def("linear(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias=None) -> ()");
  m.def(
      "int4_linear(Tensor(a!) out, Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int "
      "group_size) -> ()");
  m.def(
      "int4_dequantize(Tensor(a!) out, Tensor qweight, Tensor scales, Tensor zeros, int "
      "group_size, "
      "int row_start) -> ()");
  m.def(
      "coded_linear(Tensor(a!) out, Tensor x, Tensor low, Tensor codes, Tensor table, "
      "Tensor escape_offsets, Tensor escape_cols, Tensor escape_values, Tensor? bias=None) -> ()");
  m.def(
      "fused_moe(Tensor(a!) out, Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, "
      "Tensor topk_ids, int activation, Tensor? w13_bias=None, Tensor? w2_bias=None, "
      "float swiglu_alpha=0.0, float swiglu_limit=0.0) -> ()");
  m.def(
      "code_bf16(Tensor weight, Tensor table, Tensor(a!) low, Tensor(b!) codes, "
      "Tensor(c!) escape_offsets, Tensor(d!)? escape_cols=None, Tensor(e!)? escape_values=None) "
      "-> ()");
  m.def("load_program(Tensor[] tensors, int[] code, float[] floats) -> int");
  m.def("gguf_linear(Tensor(a!) out, Tensor x, Tensor qweight, int ggml_type) -> ()");
  m.def("gguf_dequantize(Tensor(a!) out, Tensor qweight, int ggml_type, int row_start) -> ()");
  m.def("gguf_pack(Tensor(a!) packed, Tensor qweight, int ggml_type, int k) -> ()");
  m.def(
      "gguf_packed_linear(Tensor(a!) out, Tensor x, Tensor packed, int ggml_type, int "
      "activation_bits=8) -> ()");
  m.def("gguf_packed_rows(Tensor(a!) out, Tensor ids, Tensor packed, int ggml_type, int n) -> ()");
  m.def(
      "fused_moe_coded(Tensor(a!) out, Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, "
      "Tensor topk_ids, int activation, Tensor? w13_bias, Tensor? w2_bias, float swiglu_alpha, "
      "float swiglu_limit, Tensor w13_low, Tensor w13_codes, Tensor w13_table, "
      "Tensor w13_escape_offsets, Tensor w13_escape_cols, Tensor w13_escape_values, "
      "Tensor w2_low, Tensor w2_codes, Tensor w2_table, Tensor w2_escape_offsets, "
      "Tensor w2_escape_cols, Tensor w2_escape_values) -> ()");
  m.def("run_loaded_program(int program, Tensor(a!)[] bound, int[] slots) -> ()");
  m.def("unload_program(int program) -> ()");
  m.def(
      "greedy_head(Tensor(a!) token, Tensor x, Tensor weight, Tensor q, Tensor scales, "
      "Tensor bounds) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()");
}

}  // namespace tokenmill::ops
