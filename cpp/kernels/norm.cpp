// RMSNorm, plain and fused with the residual add, accumulated in float32.
#include <vector>

#include "common.h"

namespace tokenmill::cpu {
namespace {

template <typename T>
__attribute__((always_inline)) inline void norm_row(T* out, const float* x, const T* w, int64_t dim,
                                                    float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) out[i] = from_float<T>(x[i] * inv * to_float(w[i]));
}

template <typename T>
__attribute__((always_inline)) inline void rms_row(void* out, const void* x, const void* w,
                                                   int64_t dim, float eps, float* buf) {
  load_float(buf, static_cast<const T*>(x), static_cast<int>(dim));
  norm_row(static_cast<T*>(out), buf, static_cast<const T*>(w), dim, eps);
}

// residual += x (rounded to T, as the unfused model does); x = norm(residual)
template <typename T>
__attribute__((always_inline)) inline void add_rms_row(void* x, void* residual, const void* w,
                                                       int64_t dim, float eps, float* buf) {
  T* xr = static_cast<T*>(x);
  T* rr = static_cast<T*>(residual);
  for (int64_t i = 0; i < dim; ++i) {
    T sum = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    rr[i] = sum;
    buf[i] = to_float(sum);
  }
  norm_row(xr, buf, static_cast<const T*>(w), dim, eps);
}

TM_MULTIVERSION void rms_vector(DType dtype, void* out, const void* x, const void* w, int64_t dim,
                                float eps, float* buf) {
  switch (dtype) {
    case DType::kFloat32:
      rms_row<float>(out, x, w, dim, eps, buf);
      break;
    case DType::kBFloat16:
      rms_row<bf16>(out, x, w, dim, eps, buf);
      break;
#if defined(__FLT16_MAX__)
    case DType::kFloat16:
      rms_row<f16>(out, x, w, dim, eps, buf);
      break;
#endif
    default:
      break;
  }
}

TM_MULTIVERSION void add_rms_rows(DType dtype, void* x, void* residual, const void* w, int64_t r0,
                                  int64_t r1, int64_t dim, int64_t x_stride, int64_t res_stride,
                                  float eps, float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    switch (dtype) {
      case DType::kFloat32:
        add_rms_row<float>(static_cast<float*>(x) + r * x_stride,
                           static_cast<float*>(residual) + r * res_stride, w, dim, eps, buf);
        break;
      case DType::kBFloat16:
        add_rms_row<bf16>(static_cast<bf16*>(x) + r * x_stride,
                          static_cast<bf16*>(residual) + r * res_stride, w, dim, eps, buf);
        break;
#if defined(__FLT16_MAX__)
      case DType::kFloat16:
        add_rms_row<f16>(static_cast<f16*>(x) + r * x_stride,
                         static_cast<f16*>(residual) + r * res_stride, w, dim, eps, buf);
        break;
#endif
      default:
        break;
    }
  }
}

}  // namespace

void rms_norm(DType dtype, View3 out, View3 x, const void* weight, int64_t rows, int64_t heads,
              int64_t dim, float eps) {
  const int64_t elem = dtype_size(dtype);
  auto* op = static_cast<char*>(out.data);
  const auto* xp = static_cast<const char*>(x.data);
#pragma omp parallel if (rows * heads * dim > 32768)
  {
    std::vector<float> buf(dim);
#pragma omp for
    for (int64_t i = 0; i < rows * heads; ++i) {
      const int64_t r = i / heads, h = i % heads;
      rms_vector(dtype, op + (r * out.row_stride + h * out.head_stride) * elem,
                 xp + (r * x.row_stride + h * x.head_stride) * elem, weight, dim, eps, buf.data());
    }
  }
}

void fused_add_rms_norm(DType dtype, void* x, void* residual, const void* weight, int64_t rows,
                        int64_t dim, int64_t x_stride, int64_t residual_stride, float eps) {
  dispatch_dtype(dtype, [](auto) {});
#pragma omp parallel if (rows * dim > 32768)
  {
    std::vector<float> buf(dim);
#pragma omp for
    for (int64_t r = 0; r < rows; ++r)
      add_rms_rows(dtype, x, residual, weight, r, r + 1, dim, x_stride, residual_stride, eps,
                   buf.data());
  }
}

}  // namespace tokenmill::cpu
