// The GPU kernels on host tensors, run by the host emulation, as
// torch.ops.tokenmill_emulated_gpu.*: the kernel tests run them against their
// float64 references on machines without a GPU.
#include <torch/csrc/stable/ops.h>

#include "gpu_backend.h"

namespace {

void* no_stream(const torch::stable::Tensor& t) {
  STD_TORCH_CHECK(t.is_cpu(), "the emulated GPU kernels take CPU tensors");
  return nullptr;
}

}  // namespace

STABLE_TORCH_LIBRARY(tokenmill_emulated_gpu, m) { tokenmill::ops::define_ops(m); }

STABLE_TORCH_LIBRARY_IMPL(tokenmill_emulated_gpu, CPU, m) {
  tokenmill::gpu::impl_gpu_ops<tokenmill::gpu::Backend<no_stream>>(m);
}
