// torch.ops.tokenmill.* on CUDA (or ROCm) tensors, through PyTorch's stable
// ABI. Argument checks are shared with the CPU binding (op_impls.h).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/ops.h>

#include "gpu_backend.h"

extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                             void** ret_stream);

namespace {

void* current_stream(const torch::stable::Tensor& t) {
  STD_TORCH_CHECK(t.is_cuda(), "tokenmill: expected tensors on a CUDA device");
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == 0,
                  "cannot get the current CUDA stream");
  return stream;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmill, CUDA, m) {
  tokenmill::gpu::impl_gpu_ops<tokenmill::gpu::Backend<current_stream>>(m);
}
