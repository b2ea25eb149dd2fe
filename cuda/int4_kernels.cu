// Weight-only int4 in tokenmill's layout (see cpp/kernels/int4.cpp): each
// run of 32 inputs of an output row is 16 bytes, byte j holding input j in
// its low nibble and input 16 + j in its high nibble; w = q * scale - zero.
//
// int4_linear: x [m, k] and out [m, n] in float32, bfloat16 or float16.
// Up to kGemvRows rows (decode): a warp per output row and tile of kRowsM
// activation rows; each lane loads one 16-byte run at a time, unpacks it in
// registers and multiplies it with every activation row of the tile, so the
// weight is read once per tile. More rows in 16-bit types, on tensor cores:
// a block dequantizes a kBN x 32 weight tile into shared memory and
// multiplies it with a kBM x 32 tile of x by WMMA, accumulating in float32.
// int4_dequantize writes float32 rows for the callers that want them.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsM = 8;
constexpr int64_t kGemvRows = 32;

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

// Eight consecutive elements from a 16-byte aligned address.
__device__ __forceinline__ void load8(const float* p, float v[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, float v[8]) {
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  T e[8];
  memcpy(e, &bits, sizeof(bits));  // not a pointer cast: the elements alias the vector
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}

// kAligned: x and its row stride are 16-byte aligned, so whole runs load as vectors.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kWarps* kWarpSize)
    int4_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t m, int64_t k,
                     int64_t x_stride, int64_t out_stride, const uint8_t* __restrict__ qweight,
                     const float* __restrict__ scales, const float* __restrict__ zeros,
                     int64_t k_padded, int64_t n, int64_t group_size) {
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
    const bool whole = kAligned && r * 32 + 32 <= k;
#pragma unroll
    for (int i = 0; i < kRowsM; ++i) {
      if (i < rows) {
        const T* xr = x + (m0 + i) * x_stride + r * 32;
        float a = 0.f;
        if (whole) {
#pragma unroll
          for (int j = 0; j < 32; j += 8) {
            float v[8];
            load8(xr + j, v);
#pragma unroll
            for (int e = 0; e < 8; ++e) a += v[e] * w[j + e];
          }
        } else {
          for (int j = 0; j < 32 && r * 32 + j < k; ++j) a += to_float(xr[j]) * w[j];
        }
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

#if TM_HAS_WMMA
constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kLdX = kBK + 8;  // padded rows: fewer shared-memory bank conflicts
constexpr int kLdC = kBN + 4;

template <typename T>
__global__ void __launch_bounds__(kWarps* kWarpSize)
    int4_gemm_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t m, int64_t k,
                     int64_t x_stride, int64_t out_stride, const uint8_t* __restrict__ qweight,
                     const float* __restrict__ scales, const float* __restrict__ zeros,
                     int64_t k_padded, int64_t n, int64_t group_size) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where device_has_tensor_cores()
#else
  namespace wmma = nvcuda::wmma;
  static_assert(kWarps == 4 && kBM == 64 && kBN == 64, "each warp owns a 32 x 32 output tile");
  __shared__ __align__(32) T x_s[kBM][kLdX];
  __shared__ __align__(32) T w_s[kBN][kLdX];  // w_s[n][k]: the column-major B = W^T
  __shared__ __align__(32) float c_s[kBM][kLdC];
  const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t runs = k_padded / 32, groups = (k_padded + group_size - 1) / group_size;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t r = 0; r < runs; ++r) {
    for (int i = threadIdx.x; i < kBM * kBK; i += kWarps * kWarpSize) {
      const int row = i / kBK, c = i % kBK;
      const int64_t col = r * kBK + c;
      x_s[row][c] = m0 + row < m && col < k ? x[(m0 + row) * x_stride + col] : from_float<T>(0.f);
    }
    {  // two threads per weight row, eight bytes (sixteen weights) each
      const int row = threadIdx.x / 2, half = threadIdx.x % 2;
      const int64_t nrow = n0 + row;
      if (nrow < n) {
        const int64_t g = r * 32 / group_size;
        const float s = scales[nrow * groups + g], z = zeros[nrow * groups + g];
        const unsigned long long bytes = *reinterpret_cast<const unsigned long long*>(
            qweight + nrow * (k_padded / 2) + r * 16 + half * 8);
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          const unsigned byte = static_cast<unsigned>(bytes >> (8 * b)) & 0xffu;
          w_s[row][half * 8 + b] = from_float<T>(static_cast<float>(byte & 15u) * s - z);
          w_s[row][16 + half * 8 + b] = from_float<T>(static_cast<float>(byte >> 4) * s - z);
        }
      } else {
#pragma unroll
        for (int b = 0; b < 8; ++b)
          w_s[row][half * 8 + b] = w_s[row][16 + half * 8 + b] = from_float<T>(0.f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], &x_s[wm * 32 + i * 16][kk], kLdX);
        wmma::load_matrix_sync(b[i], &w_s[wn * 32 + i * 16][kk], kLdX);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c_s[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kBM * kBN; i += kWarps * kWarpSize) {
    const int row = i / kBN, col = i % kBN;
    if (m0 + row < m && n0 + col < n)
      out[(m0 + row) * out_stride + n0 + col] = from_float<T>(c_s[row][col]);
  }
#endif
}
#endif  // TM_HAS_WMMA

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

const char* int4_linear(DType dtype, void* out, const void* x, int64_t m, int64_t k,
                        int64_t x_stride, int64_t out_stride, const uint8_t* qweight,
                        const float* scales, const float* zeros, int64_t k_padded, int64_t n,
                        int64_t group_size, void* stream) {
  if (k_padded % 32 || group_size % 32) return "k_padded and group_size must be multiples of 32";
  if (k > k_padded) return "x has more columns than the weight";
  if (m == 0 || n == 0) return nullptr;
  const char* err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    auto* xt = static_cast<const T*>(x);
#if TM_HAS_WMMA
    if constexpr (!std::is_same_v<T, float>) {
      if (m > kGemvRows && device_has_tensor_cores()) {
        const dim3 grid(static_cast<unsigned>((n + kBN - 1) / kBN),
                        static_cast<unsigned>((m + kBM - 1) / kBM));
        TM_LAUNCH(grid, kWarps * kWarpSize, stream, int4_gemm_kernel<T>)
        (o, xt, m, k, x_stride, out_stride, qweight, scales, zeros, k_padded, n, group_size);
        return;
      }
    }
#endif
    const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps),
                    static_cast<unsigned>((m + kRowsM - 1) / kRowsM));
    const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && x_stride * sizeof(T) % 16 == 0;
    auto* kernel = aligned ? int4_gemv_kernel<T, true> : int4_gemv_kernel<T, false>;
    TM_LAUNCH(grid, kWarps * kWarpSize, stream, kernel)
    (o, xt, m, k, x_stride, out_stride, qweight, scales, zeros, k_padded, n, group_size);
  });
  return err ? err : last_error();
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
