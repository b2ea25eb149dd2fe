// reshape_and_cache: one thread block per token scatters its K and V rows
// into their cache slots; negative slots are padding.
#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

template <typename T>
__global__ void reshape_and_cache_kernel(View3 key, View3 value, T* __restrict__ key_cache,
                                         T* __restrict__ value_cache,
                                         const int32_t* __restrict__ slot_mapping, int num_kv_heads,
                                         int head_size, int block_size) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  const T* k = static_cast<const T*>(key.data) + t * key.row_stride;
  const T* v = static_cast<const T*>(value.data) + t * value.row_stride;
  const int n = num_kv_heads * head_size;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / head_size, d = i % head_size;
    const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_size + d;
    key_cache[dst] = k[h * key.head_stride + d];
    value_cache[dst] = v[h * value.head_stride + d];
  }
}

}  // namespace

const char* reshape_and_cache(DType dtype, View3 key, View3 value, void* key_cache,
                              void* value_cache, const int32_t* slot_mapping, int64_t num_tokens,
                              int num_kv_heads, int head_size, int block_size, void* stream) {
  if (num_tokens == 0) return nullptr;
  const int threads = num_kv_heads * head_size < 512 ? num_kv_heads * head_size : 512;
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TM_LAUNCH(num_tokens, threads, stream, reshape_and_cache_kernel<T>)
    (key, value, static_cast<T*>(key_cache), static_cast<T*>(value_cache), slot_mapping,
     num_kv_heads, head_size, block_size);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
