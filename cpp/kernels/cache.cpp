// Writes the step's new K/V rows into their cache slots.
#include <algorithm>

#include "common.h"

namespace tokenmill::cpu {

void reshape_and_cache(DType dtype, View3 key, View3 value, void* key_cache, void* value_cache,
                       const int32_t* slot_mapping, int64_t num_tokens, int num_kv_heads,
                       int head_size, int block_size) {
  const int64_t elem = dtype_size(dtype);
  const int64_t row_bytes = head_size * elem;
  const int64_t block_elems = static_cast<int64_t>(num_kv_heads) * block_size * head_size;
  auto* kc = static_cast<char*>(key_cache);
  auto* vc = static_cast<char*>(value_cache);
  const auto* k = static_cast<const char*>(key.data);
  const auto* v = static_cast<const char*>(value.data);
#pragma omp parallel for if (num_tokens > 64)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding
    const int64_t block = slot / block_size, offset = slot % block_size;
    for (int h = 0; h < num_kv_heads; ++h) {
      const int64_t dst =
          (block * block_elems + (static_cast<int64_t>(h) * block_size + offset) * head_size) *
          elem;
      std::memcpy(kc + dst, k + (t * key.row_stride + h * key.head_stride) * elem, row_bytes);
      std::memcpy(vc + dst, v + (t * value.row_stride + h * value.head_stride) * elem, row_bytes);
    }
  }
}

}  // namespace tokenmill::cpu
