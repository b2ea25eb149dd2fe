// torch.ops.tokenmill.* on the CPU, through PyTorch's stable ABI. Schemas
// and fake implementations live in python/tokenmill/ops.py.
#include "op_impls.h"
#include "tokenmill/kernels.h"

namespace {

using torch::stable::Tensor;
namespace cpu = tokenmill::cpu;

// The CPU kernels, ignoring the tensor that names the device.
struct Cpu {
  template <class... A>
  static void reshape_and_cache(const Tensor&, A... a) {
    cpu::reshape_and_cache(a...);
  }
  static void paged_attention(const Tensor&, const tokenmill::PagedAttentionParams& p) {
    cpu::paged_attention(p);
  }
  template <class... A>
  static void rms_norm(const Tensor&, A... a) {
    cpu::rms_norm(a...);
  }
  template <class... A>
  static void fused_add_rms_norm(const Tensor&, A... a) {
    cpu::fused_add_rms_norm(a...);
  }
  template <class... A>
  static void rotary_embedding(const Tensor&, A... a) {
    cpu::rotary_embedding(a...);
  }
  template <class... A>
  static void act_and_mul(const Tensor&, A... a) {
    cpu::act_and_mul(a...);
  }
  template <class... A>
  static void linear(const Tensor&, A... a) {
    cpu::linear(a...);
  }
  template <class... A>
  static void int4_linear(const Tensor&, A... a) {
    cpu::int4_linear(a...);
  }
  template <class... A>
  static void int4_dequantize(const Tensor&, A... a) {
    cpu::int4_dequantize(a...);
  }
};

}  // namespace

STABLE_TORCH_LIBRARY(tokenmill, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, "
      "int sliding_window=0, float softcap=0.0, Tensor? alibi_slopes=None) -> ()");
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
}

STABLE_TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("reshape_and_cache", TORCH_BOX(&tokenmill::ops::reshape_and_cache<Cpu>));
  m.impl("paged_attention", TORCH_BOX(&tokenmill::ops::paged_attention<Cpu>));
  m.impl("rms_norm", TORCH_BOX(&tokenmill::ops::rms_norm<Cpu>));
  m.impl("fused_add_rms_norm", TORCH_BOX(&tokenmill::ops::fused_add_rms_norm<Cpu>));
  m.impl("rotary_embedding", TORCH_BOX(&tokenmill::ops::rotary_embedding<Cpu>));
  m.impl("silu_and_mul", TORCH_BOX(&tokenmill::ops::silu_and_mul<Cpu>));
  m.impl("gelu_and_mul", TORCH_BOX(&tokenmill::ops::gelu_and_mul<Cpu>));
  m.impl("linear", TORCH_BOX(&tokenmill::ops::linear<Cpu>));
  m.impl("int4_linear", TORCH_BOX(&tokenmill::ops::int4_linear<Cpu>));
  m.impl("int4_dequantize", TORCH_BOX(&tokenmill::ops::int4_dequantize<Cpu>));
}
