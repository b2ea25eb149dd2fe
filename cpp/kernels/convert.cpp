// Rows of any supported float dtype to float32 and back.
#include "common.h"

namespace tokenmill::cpu {

void rows_to_float(DType dtype, float* dst, const void* src, int64_t m, int64_t k,
                   int64_t src_stride, int64_t dst_stride) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) dst[r * dst_stride + i] = to_float(s[r * src_stride + i]);
  });
}

void rows_from_float(DType dtype, void* dst, const float* src, int64_t m, int64_t k,
                     int64_t dst_stride, int64_t src_stride) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* d = static_cast<T*>(dst);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i)
        d[r * dst_stride + i] = from_float<T>(src[r * src_stride + i]);
  });
}

}  // namespace tokenmill::cpu
