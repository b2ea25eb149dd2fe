// Weight-only int4 in tokenmill's layout (see cpp/kernels/int4.cpp): each
// run of 32 inputs of an output row is 16 bytes, byte j holding input j in
// its low nibble and input 16 + j in its high nibble; w = q * scale - zero.
//
// int4_linear: a warp per output row and tile of kRowsM activation rows. Each
// lane loads one 16-byte run at a time, unpacks it in registers and
// multiplies it with every activation row of the tile, so the weight is read
// once per tile. Larger batches go through int4_dequantize and a dense GEMM.
#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsM = 8;

__device__ __forceinline__ void unpack_run(const uint4 packed, float s, float z, float w[32]) {
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (words[i] >> (8 * b)) & 0xffu;
      w[4 * i + b] = static_cast<float>(byte & 15u) * s - z;
      w[16 + 4 * i + b] = static_cast<float>(byte >> 4) * s - z;
    }
}

__global__ void __launch_bounds__(kWarps* kWarpSize)
    int4_linear_kernel(float* __restrict__ out, const float* __restrict__ x, int64_t m,
                       const uint8_t* __restrict__ qweight, const float* __restrict__ scales,
                       const float* __restrict__ zeros, int64_t k_padded, int64_t n,
                       int64_t group_size) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= n) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsM;
  const int rows = static_cast<int>(m - m0 < kRowsM ? m - m0 : kRowsM);
  const int64_t runs = k_padded / 32, groups = (k_padded + group_size - 1) / group_size;
  const uint4* q = reinterpret_cast<const uint4*>(qweight + row * (k_padded / 2));
  float acc[kRowsM] = {};
  for (int64_t r = lane; r < runs; r += kWarpSize) {
    const int64_t g = r * 32 / group_size;
    float w[32];
    unpack_run(q[r], scales[row * groups + g], zeros[row * groups + g], w);
#pragma unroll
    for (int i = 0; i < kRowsM; ++i) {
      if (i < rows) {
        const float4* xr = reinterpret_cast<const float4*>(x + (m0 + i) * k_padded + r * 32);
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float4 xv = xr[j];
          a += xv.x * w[4 * j] + xv.y * w[4 * j + 1] + xv.z * w[4 * j + 2] + xv.w * w[4 * j + 3];
        }
        acc[i] += a;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsM; ++i) {
    const float total = warp_sum(acc[i]);
    if (lane == 0 && i < rows) out[(m0 + i) * n + row] = total;
  }
}

// A thread per 16-byte run.
__global__ void int4_dequantize_kernel(float* __restrict__ out, const uint8_t* __restrict__ qweight,
                                       const float* __restrict__ scales,
                                       const float* __restrict__ zeros, int64_t k_padded,
                                       int64_t group_size, int64_t n0, int64_t n1) {
  const int64_t runs = k_padded / 32, groups = (k_padded + group_size - 1) / group_size;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= (n1 - n0) * runs) return;
  const int64_t row = n0 + i / runs, r = i % runs, g = r * 32 / group_size;
  float w[32];
  unpack_run(reinterpret_cast<const uint4*>(qweight + row * (k_padded / 2))[r],
             scales[row * groups + g], zeros[row * groups + g], w);
  float4* dst = reinterpret_cast<float4*>(out + (row - n0) * k_padded + r * 32);
#pragma unroll
  for (int j = 0; j < 8; ++j)
    dst[j] = make_float4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
}

}  // namespace

const char* int4_linear(float* out, const float* x, int64_t m, const uint8_t* qweight,
                        const float* scales, const float* zeros, int64_t k_padded, int64_t n,
                        int64_t group_size, void* stream) {
  if (k_padded % 32 || group_size % 32) return "k_padded and group_size must be multiples of 32";
  if (m == 0 || n == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps),
                  static_cast<unsigned>((m + kRowsM - 1) / kRowsM));
  TM_LAUNCH(grid, kWarps * kWarpSize, stream, int4_linear_kernel)
  (out, x, m, qweight, scales, zeros, k_padded, n, group_size);
  return last_error();
}

const char* int4_dequantize(float* out, const uint8_t* qweight, const float* scales,
                            const float* zeros, int64_t k_padded, int64_t group_size, int64_t n0,
                            int64_t n1, void* stream) {
  if (k_padded % 32 || group_size % 32) return "k_padded and group_size must be multiples of 32";
  const int64_t work = (n1 - n0) * (k_padded / 32);
  if (work <= 0) return nullptr;
  TM_LAUNCH(static_cast<unsigned>((work + 255) / 256), 256, stream, int4_dequantize_kernel)
  (out, qweight, scales, zeros, k_padded, group_size, n0, n1);
  return last_error();
}

}  // namespace tokenmill::gpu
