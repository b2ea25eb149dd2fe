// GGUF block weights in the file's layout (rows of blocks, as ggml stores
// them): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the K types Q4_K, Q5_K, Q6_K,
// whose 256-weight super-blocks are read per 32-weight sub-block.
//
// gguf_linear: x [m, k] and out [m, n] of one dtype, for decode-sized m: a
// warp per output row and tile of kRowsM activation rows; each lane decodes
// one 32-weight block at a time in registers and multiplies it with every
// row of the tile, so the weight is read once per tile.
// gguf_dequantize: rows n0..n1 in float32, bfloat16 or float16, for the
// callers that multiply larger batches on the vendor's BLAS.
#include <cstring>

#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsM = 8;

// Products and sums rounded as written, never fused: dequantized values
// equal the gguf package's bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

__device__ __forceinline__ float half_at(const uint8_t* p) {
  __half h;
  memcpy(&h, p, 2);
  return __half2float(h);
}

__device__ __forceinline__ bool is_k_type(GgufType t) {
  return t == GgufType::kQ4_K || t == GgufType::kQ5_K || t == GgufType::kQ6_K;
}

// Scale and minimum j (0-7) of a Q4_K or Q5_K super-block's 12 scale bytes.
__device__ __forceinline__ void scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The 32 weights of block b (32-weight block, or K sub-block) of a row whose
// blocks (K: super-blocks) take `bytes` bytes each.
__device__ __forceinline__ void decode_block(GgufType t, int64_t bytes, const uint8_t* row,
                                             int64_t b, float w[32]) {
  if (is_k_type(t)) {
    const uint8_t* sb = row + (b / 8) * bytes;
    const int s = static_cast<int>(b % 8);
    if (t == GgufType::kQ6_K) {
      const int half = s / 4, quarter = s % 4;
      const uint8_t* ql = sb + 64 * half + 32 * (quarter % 2);
      const uint8_t* qh = sb + 128 + 32 * half;
      const int8_t* sc = reinterpret_cast<const int8_t*>(sb + 192) + 8 * half + 2 * quarter;
      const float d = half_at(sb + 208);
      const float d0 = mul_rn(d, static_cast<float>(sc[0])),
                  d1 = mul_rn(d, static_cast<float>(sc[1]));
      for (int l = 0; l < 32; ++l) {
        const int q = ((ql[l] >> (4 * (quarter / 2))) & 15) | (((qh[l] >> (2 * quarter)) & 3) << 4);
        w[l] = mul_rn(l < 16 ? d0 : d1, static_cast<float>(q - 32));
      }
      return;
    }
    int sc, mn;
    scale_min(sb + 4, s, sc, mn);
    const float d = mul_rn(half_at(sb), static_cast<float>(sc));
    const float m = mul_rn(half_at(sb + 2), static_cast<float>(mn));
    const uint8_t* qs = sb + (t == GgufType::kQ5_K ? 48 : 16) + 32 * (s / 2);
    for (int l = 0; l < 32; ++l) {
      int q = (qs[l] >> (4 * (s % 2))) & 15;
      if (t == GgufType::kQ5_K) q |= ((sb[16 + l] >> s) & 1) << 4;
      w[l] = add_rn(mul_rn(d, static_cast<float>(q)), -m);
    }
    return;
  }
  const uint8_t* blk = row + b * bytes;
  const float d = half_at(blk);
  if (t == GgufType::kQ8_0) {
    for (int l = 0; l < 32; ++l)
      w[l] = mul_rn(static_cast<float>(static_cast<int8_t>(blk[2 + l])), d);
    return;
  }
  const bool has_min = t == GgufType::kQ4_1 || t == GgufType::kQ5_1;
  const bool five = t == GgufType::kQ5_0 || t == GgufType::kQ5_1;
  const float m = has_min ? half_at(blk + 2) : 0.f;
  const uint8_t* qs = blk + 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
  uint32_t qh = 0;
  if (five) memcpy(&qh, blk + 2 + (has_min ? 2 : 0), 4);
  const int offset = has_min ? 0 : (five ? 16 : 8);
  for (int l = 0; l < 16; ++l) {
    int lo = qs[l] & 15, hi = qs[l] >> 4;
    if (five) {
      lo |= ((qh >> l) & 1) << 4;
      hi |= ((qh >> (l + 16)) & 1) << 4;
    }
    if (has_min) {
      w[l] = add_rn(mul_rn(d, static_cast<float>(lo)), m);
      w[l + 16] = add_rn(mul_rn(d, static_cast<float>(hi)), m);
    } else {
      w[l] = mul_rn(d, static_cast<float>(lo - offset));
      w[l + 16] = mul_rn(d, static_cast<float>(hi - offset));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps* kWarpSize)
    gguf_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t m, int64_t k,
                     int64_t x_stride, int64_t out_stride, const uint8_t* __restrict__ qweight,
                     GgufType type, int64_t block_bytes, int64_t row_bytes, int64_t n) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= n) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsM;
  const int rows = static_cast<int>(m - m0 < kRowsM ? m - m0 : kRowsM);
  float acc[kRowsM] = {};
  for (int64_t b = lane; b < k / 32; b += kWarpSize) {
    float w[32];
    decode_block(type, block_bytes, qweight + row * row_bytes, b, w);
#pragma unroll
    for (int i = 0; i < kRowsM; ++i) {
      if (i < rows) {
        const T* xr = x + (m0 + i) * x_stride + b * 32;
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < 32; ++j) a += to_float(xr[j]) * w[j];
        acc[i] += a;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsM; ++i) {
    const float total = warp_sum(acc[i]);
    if (lane == 0 && i < rows) out[(m0 + i) * out_stride + row] = from_float<T>(total);
  }
}

// A thread per 32-weight block.
template <typename T>
__global__ void gguf_dequantize_kernel(T* __restrict__ out, const uint8_t* __restrict__ qweight,
                                       GgufType type, int64_t block_bytes, int64_t row_bytes,
                                       int64_t k, int64_t n0, int64_t n1) {
  const int64_t blocks = k / 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= (n1 - n0) * blocks) return;
  const int64_t row = n0 + i / blocks, b = i % blocks;
  float w[32];
  decode_block(type, block_bytes, qweight + row * row_bytes, b, w);
  T* dst = out + (row - n0) * k + b * 32;
#pragma unroll
  for (int j = 0; j < 32; ++j) dst[j] = from_float<T>(w[j]);
}

const char* check_type(int64_t ggml_type, int64_t k) {
  switch (static_cast<GgufType>(ggml_type)) {
    case GgufType::kQ4_0:
    case GgufType::kQ4_1:
    case GgufType::kQ5_0:
    case GgufType::kQ5_1:
    case GgufType::kQ8_0:
      return k % 32 ? "k must be a multiple of 32" : nullptr;
    case GgufType::kQ4_K:
    case GgufType::kQ5_K:
    case GgufType::kQ6_K:
      return k % 256 ? "k must be a multiple of 256 for K types" : nullptr;
    default:
      return "unsupported GGUF block type";
  }
}

}  // namespace

int64_t gguf_row_bytes(int64_t ggml_type, int64_t k) {
  const auto t = static_cast<GgufType>(ggml_type);
  return k / gguf_block_weights(t) * gguf_block_bytes(t);
}

const char* gguf_linear(DType dtype, void* out, const void* x, int64_t m, int64_t k,
                        int64_t x_stride, int64_t out_stride, const uint8_t* qweight,
                        int64_t ggml_type, int64_t row_bytes, int64_t n, void* stream) {
  if (const char* err = check_type(ggml_type, k)) return err;
  if (m == 0 || n == 0) return nullptr;
  const auto type = static_cast<GgufType>(ggml_type);
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps),
                    static_cast<unsigned>((m + kRowsM - 1) / kRowsM));
    TM_LAUNCH(grid, kWarps * kWarpSize, stream, gguf_gemv_kernel<T>)
    (static_cast<T*>(out), static_cast<const T*>(x), m, k, x_stride, out_stride, qweight, type,
     gguf_block_bytes(type), row_bytes, n);
  });
  return err ? err : last_error();
}

const char* gguf_dequantize(DType dtype, void* out, const uint8_t* qweight, int64_t ggml_type,
                            int64_t row_bytes, int64_t k, int64_t n0, int64_t n1, void* stream) {
  if (const char* err = check_type(ggml_type, k)) return err;
  const int64_t work = (n1 - n0) * (k / 32);
  if (work <= 0) return nullptr;
  const auto type = static_cast<GgufType>(ggml_type);
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TM_LAUNCH(static_cast<unsigned>((work + 255) / 256), 256, stream, gguf_dequantize_kernel<T>)
    (static_cast<T*>(out), qweight, type, gguf_block_bytes(type), row_bytes, k, n0, n1);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
