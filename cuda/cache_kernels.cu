// reshape_and_cache: one thread block per token scatters its K and V rows
// into their cache slots; negative slots are padding.
#include "compat.h"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

template <typename T>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, int64_t ks_row, int64_t ks_head,
                                         const T* __restrict__ value, int64_t vs_row,
                                         int64_t vs_head, T* __restrict__ key_cache,
                                         T* __restrict__ value_cache,
                                         const int32_t* __restrict__ slot_mapping, int num_kv_heads,
                                         int head_size, int block_size) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int n = num_kv_heads * head_size;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / head_size, d = i % head_size;
    const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_size + d;
    key_cache[dst] = key[t * ks_row + h * ks_head + d];
    value_cache[dst] = value[t * vs_row + h * vs_head + d];
  }
}

template <typename T>
void launch(const void* key, int64_t ksr, int64_t ksh, const void* value, int64_t vsr, int64_t vsh,
            void* kc, void* vc, const int32_t* slots, int64_t num_tokens, int nkv, int hs, int bs,
            tmStream_t stream) {
  const int threads = nkv * hs < 512 ? nkv * hs : 512;
  reshape_and_cache_kernel<T><<<num_tokens, threads, 0, stream>>>(
      static_cast<const T*>(key), ksr, ksh, static_cast<const T*>(value), vsr, vsh,
      static_cast<T*>(kc), static_cast<T*>(vc), slots, nkv, hs, bs);
}

}  // namespace

const char* reshape_and_cache(int elem_size, const void* key, int64_t ksr, int64_t ksh,
                              const void* value, int64_t vsr, int64_t vsh, void* key_cache,
                              void* value_cache, const int32_t* slot_mapping, int64_t num_tokens,
                              int num_kv_heads, int head_size, int block_size, void* stream) {
  if (num_tokens == 0) return nullptr;
  auto s = static_cast<tmStream_t>(stream);
  if (elem_size == 4)
    launch<float>(key, ksr, ksh, value, vsr, vsh, key_cache, value_cache, slot_mapping, num_tokens,
                  num_kv_heads, head_size, block_size, s);
  else if (elem_size == 2)
    launch<uint16_t>(key, ksr, ksh, value, vsr, vsh, key_cache, value_cache, slot_mapping,
                     num_tokens, num_kv_heads, head_size, block_size, s);
  else
    return "unsupported element size";
  tmError_t err = tmGetLastError();
  return err == tmSuccess ? nullptr : tmGetErrorString(err);
}

}  // namespace tokenmill::gpu
