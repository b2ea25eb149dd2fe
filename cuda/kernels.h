// Launchers of the GPU kernels on raw device pointers and a stream; the
// cache layout matches the CPU kernels (cpp/include/tokenmill/kernels.h).
#pragma once

#include <cstdint>

namespace tokenmill::gpu {

// Returns an error string, or nullptr on success.
const char* reshape_and_cache(int elem_size, const void* key, int64_t key_row_stride,
                              int64_t key_head_stride, const void* value, int64_t value_row_stride,
                              int64_t value_head_stride, void* key_cache, void* value_cache,
                              const int32_t* slot_mapping, int64_t num_tokens, int num_kv_heads,
                              int head_size, int block_size, void* stream);

}  // namespace tokenmill::gpu
