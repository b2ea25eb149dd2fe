// torch.ops.tokenmill.* on CUDA (or ROCm) tensors, through PyTorch's stable
// ABI. Argument checks are shared with the CPU binding (op_impls.h).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/ops.h>

#include "kernels.h"
#include "op_impls.h"

extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                             void** ret_stream);

namespace {

using torch::stable::Tensor;
namespace gpu = tokenmill::gpu;

void* stream_of(const Tensor& t) {
  STD_TORCH_CHECK(t.is_cuda(), "tokenmill: expected tensors on a CUDA device");
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == 0,
                  "cannot get the current CUDA stream");
  return stream;
}

void check(const char* err, const char* op) { STD_TORCH_CHECK(err == nullptr, op, ": ", err); }

// The GPU launchers on the device and current stream of the given tensor.
struct Gpu {
  static constexpr bool kHost = false;
  template <class... A>
  static void reshape_and_cache(const Tensor& t, A... a) {
    check(gpu::reshape_and_cache(a..., stream_of(t)), "reshape_and_cache");
  }
  static void paged_attention(const Tensor& query, const tokenmill::PagedAttentionParams& p) {
    const int64_t tokens = query.size(0);
    const int splits = gpu::paged_attention_splits(p, tokens);
    const int64_t floats = gpu::paged_attention_workspace_floats(p, tokens, splits);
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
  template <class... A>
  static void int4_dequantize(const Tensor& t, A... a) {
    check(gpu::int4_dequantize(a..., stream_of(t)), "int4_dequantize");
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmill, CUDA, m) {
  using namespace tokenmill::ops;
  m.impl("reshape_and_cache", TORCH_BOX(&reshape_and_cache<Gpu>));
  m.impl("paged_attention", TORCH_BOX(&paged_attention<Gpu>));
  m.impl("rms_norm", TORCH_BOX(&rms_norm<Gpu>));
  m.impl("fused_add_rms_norm", TORCH_BOX(&fused_add_rms_norm<Gpu>));
  m.impl("rotary_embedding", TORCH_BOX(&rotary_embedding<Gpu>));
  m.impl("silu_and_mul", TORCH_BOX(&silu_and_mul<Gpu>));
  m.impl("gelu_and_mul", TORCH_BOX(&gelu_and_mul<Gpu>));
  m.impl("int4_linear", TORCH_BOX(&int4_linear<Gpu>));
  m.impl("int4_dequantize", TORCH_BOX(&int4_dequantize<Gpu>));
}
