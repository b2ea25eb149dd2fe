// The CUDA execution model on the host, so that the kernel sources in cuda/
// run in tests on machines without a GPU (cuda/compat.h includes this header
// when TOKENMILL_GPU_EMULATION is defined). A launch runs its thread blocks
// one after another on the calling thread. Each GPU thread of a block is a
// fiber that runs until it waits at a barrier (__syncthreads, a warp shuffle)
// or ends, and then hands over to the next, so a thread that reads shared
// memory before the barrier that publishes it reads stale data and a test
// sees it. __shared__ variables are statics: one block runs at a time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The 16-bit float types as bit patterns, converted with round-to-nearest-even.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <class A, class B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

namespace tokenmill::gpu::emulation {

constexpr int kWarpSize = 32;

struct Position {
  dim3 thread, block, block_dim, grid_dim;
};
extern const Position* current;  // the running fiber's

void sync_block();
void sync_warp();
// Every lane of the caller's warp passes its value; each gets lane `src`'s.
uint64_t exchange(uint64_t value, int src);
// Runs thread_body once per GPU thread of every block, as described above.
void run(dim3 grid, dim3 block, const std::function<void()>& thread_body);

// A thread's index within its block, x fastest, as warps are formed.
inline int thread_rank(const Position& p) {
  return static_cast<int>((p.thread.z * p.block_dim.y + p.thread.y) * p.block_dim.x + p.thread.x);
}

inline int lane() { return thread_rank(*current) % kWarpSize; }

template <class... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);
  template <class... A>
  void operator()(A&&... args) const {
    // Arguments convert to the parameter types, as in a launch on the device.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run(grid, block, [&] { std::apply(kernel, params); });
  }
};

template <class... P>
Launch<P...> launch(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return {grid, block, kernel};
}

}  // namespace tokenmill::gpu::emulation

#define threadIdx (::tokenmill::gpu::emulation::current->thread)
#define blockIdx (::tokenmill::gpu::emulation::current->block)
#define blockDim (::tokenmill::gpu::emulation::current->block_dim)
#define gridDim (::tokenmill::gpu::emulation::current->grid_dim)

inline void __syncthreads() { ::tokenmill::gpu::emulation::sync_block(); }
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  ::tokenmill::gpu::emulation::sync_warp();
}

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  namespace emu = ::tokenmill::gpu::emulation;
  bits = emu::exchange(bits, emu::lane() ^ lane_mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Warp matrix products (mma.h). A fragment holds its whole tile in every lane
// (on the device the lanes share it out in a layout code may not rely on),
// and loads and stores are collective: the warp meets before and after.
namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];
};

namespace detail {
inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline bool row_major_layout(row_major*) { return true; }
inline bool row_major_layout(col_major*) { return false; }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const T& value) {
  for (T& e : f.x) e = value;
}

template <class Use, int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  const bool rows = detail::row_major_layout(static_cast<L*>(nullptr));
  ::tokenmill::gpu::emulation::sync_warp();
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = rows ? p[r * ldm + c] : p[c * ldm + r];
  ::tokenmill::gpu::emulation::sync_warp();
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t l) {
  ::tokenmill::gpu::emulation::sync_warp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  ::tokenmill::gpu::emulation::sync_warp();
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  ::tokenmill::gpu::emulation::sync_warp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
  ::tokenmill::gpu::emulation::sync_warp();
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float af[M * K], bf[K * N], out[M * N];
  for (int i = 0; i < M * K; ++i) af[i] = detail::to_float(a.x[i]);
  for (int i = 0; i < K * N; ++i) bf[i] = detail::to_float(b.x[i]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += af[i * K + k] * bf[k * N + j];
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace nvcuda::wmma
