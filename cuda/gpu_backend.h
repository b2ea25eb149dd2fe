// The GPU kernels as a backend of the shared op entry points (op_impls.h):
// ops_cuda.cpp binds them to CUDA tensors on the current stream, and
// emulation/ops.cpp to host tensors through the host emulation.
#pragma once

#include <optional>

#include "kernels.h"
#include "op_impls.h"

namespace tokenmill::gpu {

inline void check(const char* err, const char* op) {
  STD_TORCH_CHECK(err == nullptr, op, ": ", err);
}

// stream_of(tensor) gives the stream to launch on for that tensor's device.
template <void* (*stream_of)(const torch::stable::Tensor&)>
struct Backend {
  using Tensor = torch::stable::Tensor;
  static constexpr bool kHost = false;
  template <class... A>
  static void reshape_and_cache(const Tensor& t, A... a) {
    check(gpu::reshape_and_cache(a..., stream_of(t)), "reshape_and_cache");
  }
  static void paged_attention(const Tensor& query, const PagedAttentionParams& p) {
    const int64_t tokens = query.size(0);
    const int splits = paged_attention_splits(p, tokens);
    const int64_t floats = paged_attention_workspace_floats(p, tokens, splits);
    std::optional<Tensor> workspace;
    if (floats > 0)
      workspace = torch::stable::new_empty(query, {floats}, torch::headeronly::ScalarType::Float);
    float* ws = workspace ? static_cast<float*>(workspace->data_ptr()) : nullptr;
    check(gpu::paged_attention(p, tokens, splits, ws, stream_of(query)), "paged_attention");
  }
  template <class... A>
  static void rms_norm(const Tensor& t, A... a) {
    check(gpu::rms_norm(a..., stream_of(t)), "rms_norm");
  }
  template <class... A>
  static void fused_add_rms_norm(const Tensor& t, A... a) {
    check(gpu::fused_add_rms_norm(a..., stream_of(t)), "fused_add_rms_norm");
  }
  template <class... A>
  static void rotary_embedding(const Tensor& t, A... a) {
    check(gpu::rotary_embedding(a..., stream_of(t)), "rotary_embedding");
  }
  template <class... A>
  static void act_and_mul(const Tensor& t, A... a) {
    check(gpu::act_and_mul(a..., stream_of(t)), "act_and_mul");
  }
  template <class... A>
  static void int4_linear(const Tensor& t, A... a) {
    check(gpu::int4_linear(a..., stream_of(t)), "int4_linear");
  }
  static void fused_moe(const Tensor& x, const MoeParams& p) {
    const Tensor workspace = torch::stable::new_empty(x, {fused_moe_workspace_floats(p)},
                                                      torch::headeronly::ScalarType::Float);
    check(gpu::fused_moe(p, static_cast<float*>(workspace.data_ptr()), stream_of(x)), "fused_moe");
  }
  template <class... A>
  static void int4_dequantize(const Tensor& t, A... a) {
    check(gpu::int4_dequantize(a..., stream_of(t)), "int4_dequantize");
  }
  template <class... A>
  static void gguf_linear(const Tensor& t, A... a) {
    check(gpu::gguf_linear(a..., stream_of(t)), "gguf_linear");
  }
  template <class... A>
  static void gguf_dequantize(const Tensor& t, A... a) {
    check(gpu::gguf_dequantize(a..., stream_of(t)), "gguf_dequantize");
  }
};

// qweight uint8 [n, row bytes] of GGUF blocks of rows of k weights.
inline int64_t checked_row_bytes(const torch::stable::Tensor& qweight, int64_t ggml_type,
                                 int64_t k) {
  const int64_t row_bytes = gguf_row_bytes(ggml_type, k);
  STD_TORCH_CHECK(row_bytes > 0, "GGUF block type ", ggml_type, " is not supported");
  STD_TORCH_CHECK(qweight.scalar_type() == torch::headeronly::ScalarType::Byte &&
                      qweight.dim() == 2 && qweight.is_contiguous() && qweight.size(1) == row_bytes,
                  "qweight must be contiguous uint8 [n, row bytes] for rows of k weights");
  return row_bytes;
}

// out [m, n] = x [m, k] . dequant(qweight)^T; x and out of one dtype, unit column stride.
template <class B>
void gguf_linear(torch::stable::Tensor out, torch::stable::Tensor x, torch::stable::Tensor qweight,
                 int64_t ggml_type) {
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1,
                  "gguf_linear: x must be [m, k] with unit stride");
  const int64_t row_bytes = checked_row_bytes(qweight, ggml_type, x.size(1));
  STD_TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == qweight.size(0) &&
                      out.stride(1) == 1,
                  "gguf_linear: out must be [m, n] with unit stride");
  ops::check_same_dtype(x, out, "out");
  B::gguf_linear(x, ops::dtype_of(x), out.data_ptr(), x.data_ptr(), x.size(0), x.size(1),
                 x.stride(0), out.stride(0), static_cast<const uint8_t*>(qweight.data_ptr()),
                 ggml_type, row_bytes, qweight.size(0));
}

// out [rows, k] (any float dtype, contiguous) = rows row_start.. of the weight, dequantized.
template <class B>
void gguf_dequantize(torch::stable::Tensor out, torch::stable::Tensor qweight, int64_t ggml_type,
                     int64_t row_start) {
  STD_TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "gguf_dequantize: out must be contiguous");
  const int64_t row_bytes = checked_row_bytes(qweight, ggml_type, out.size(1));
  STD_TORCH_CHECK(row_start >= 0 && row_start + out.size(0) <= qweight.size(0),
                  "gguf_dequantize: rows outside the weight");
  B::gguf_dequantize(qweight, ops::dtype_of(out), out.data_ptr(),
                     static_cast<const uint8_t*>(qweight.data_ptr()), ggml_type, row_bytes,
                     out.size(1), row_start, row_start + out.size(0));
}

// Registers every op that has a GPU kernel (dense layers run on the vendor's BLAS).
template <class B>
void impl_gpu_ops(torch::stable::detail::StableLibrary& m) {
  namespace ops = tokenmill::ops;
  m.impl("reshape_and_cache", TORCH_BOX(&ops::reshape_and_cache<B>));
  m.impl("paged_attention", TORCH_BOX(&ops::paged_attention<B>));
  m.impl("rms_norm", TORCH_BOX(&ops::rms_norm<B>));
  m.impl("fused_add_rms_norm", TORCH_BOX(&ops::fused_add_rms_norm<B>));
  m.impl("rotary_embedding", TORCH_BOX(&ops::rotary_embedding<B>));
  m.impl("silu_and_mul", TORCH_BOX(&ops::silu_and_mul<B>));
  m.impl("gelu_and_mul", TORCH_BOX(&ops::gelu_and_mul<B>));
  m.impl("int4_linear", TORCH_BOX(&ops::int4_linear<B>));
  m.impl("int4_dequantize", TORCH_BOX(&ops::int4_dequantize<B>));
  m.impl("fused_moe", TORCH_BOX(&ops::fused_moe<B>));
  m.impl("gguf_linear", TORCH_BOX(&gguf_linear<B>));
  m.impl("gguf_dequantize", TORCH_BOX(&gguf_dequantize<B>));
}

}  // namespace tokenmill::gpu
