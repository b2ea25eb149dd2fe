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
};

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
}

}  // namespace tokenmill::gpu
