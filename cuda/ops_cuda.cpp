// torch.ops.tokenmill.* on CUDA tensors, through PyTorch's stable ABI.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

#include "kernels.h"

extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                             void** ret_stream);

namespace {

using torch::stable::Tensor;

void* current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == 0,
                  "cannot get the current CUDA stream");
  return stream;
}

void reshape_and_cache(Tensor key, Tensor value, Tensor key_cache, Tensor value_cache,
                       Tensor slot_mapping) {
  STD_TORCH_CHECK(key.scalar_type() == key_cache.scalar_type(), "key_cache dtype mismatch");
  STD_TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous(),
                  "caches must be contiguous [num_blocks, num_kv_heads, block_size, head_size]");
  const int64_t hs = key_cache.size(3);
  auto head_stride = [&](const Tensor& t) { return t.dim() == 3 ? t.stride(1) : hs; };
  const char* err = tokenmill::gpu::reshape_and_cache(
      static_cast<int>(key.element_size()), key.data_ptr(), key.stride(0), head_stride(key),
      value.data_ptr(), value.stride(0), head_stride(value), key_cache.data_ptr(),
      value_cache.data_ptr(), static_cast<const int32_t*>(slot_mapping.data_ptr()),
      slot_mapping.numel(), static_cast<int>(key_cache.size(1)), static_cast<int>(hs),
      static_cast<int>(key_cache.size(2)), current_stream(key));
  STD_TORCH_CHECK(err == nullptr, "reshape_and_cache: ", err ? err : "");
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmill, CUDA, m) {
  m.impl("reshape_and_cache", TORCH_BOX(&reshape_and_cache));
}

extern "C" const char* tokenmill_cuda_archs() { return TOKENMILL_CUDA_ARCHS; }
