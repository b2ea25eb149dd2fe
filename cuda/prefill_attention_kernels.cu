// Paged attention for batches with prefill, tiled on tensor cores (WMMA). A
// thread block takes kRows query rows of one sequence and one KV head, a row
// being a (token, query head) pair of the heads that share the KV head, so a
// key tile is read once for the whole group (GQA/MQA). It walks the
// sequence's keys kKeys at a time through the block table: S = Q K^T into
// shared memory, an online softmax over each row of S by the threads, then
// O += P V, with O kept in float32 in shared memory where it is rescaled as
// a row's maximum moves (a fragment's layout is the hardware's, so rows
// cannot be rescaled in registers).
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {

#if TM_HAS_WMMA
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kRows = 32;
constexpr int kKeys = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxHead = 128;
constexpr int kThreadsPerRow = kThreads / kRows;
constexpr int kColsPerThread = kKeys / kThreadsPerRow;
static_assert(kWarps == (kRows / 16) * (kKeys / 16), "one S tile per warp");

struct Tile {
  int seq, row0;  // seq < 0: past the last tile
};

// Block b's tile: sequences in order, each ceil(query_len * group / kRows) tiles.
__device__ Tile tile_of(const PagedAttentionParams& p, int group, int b) {
  for (int s = 0; s < p.num_seqs; ++s) {
    const int rows = (p.query_start_loc[s + 1] - p.query_start_loc[s]) * group;
    const int tiles = (rows + kRows - 1) / kRows;
    if (b < tiles) return {s, b * kRows};
    b -= tiles;
  }
  return {-1, 0};
}

// DP: the head size rounded up to a multiple of 64; columns past it are zeros.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefill_attention_kernel(PagedAttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // 16-bit WMMA of both types needs sm_80; prefill_attention_fits checks the device
#else
  __shared__ __align__(32) T q_s[kRows][DP];
  __shared__ __align__(32) T k_s[kKeys][DP];
  __shared__ __align__(32) T v_s[kKeys][DP];
  __shared__ __align__(32) T p_s[kRows][kKeys];
  __shared__ __align__(32) float s_s[kRows][kKeys];
  __shared__ __align__(32) float o_s[kRows][DP];
  __shared__ float m_s[kRows], l_s[kRows], corr_s[kRows];
  __shared__ int pos_s[kRows];  // the row's token position; -1 past the sequence's rows
  __shared__ Tile tile;

  const int kvh = blockIdx.y, D = p.head_size, group = p.num_heads / p.num_kv_heads;
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x == 0) tile = tile_of(p, group, blockIdx.x);
  __syncthreads();
  if (tile.seq < 0) return;
  const int q0 = p.query_start_loc[tile.seq];
  const int rows = (p.query_start_loc[tile.seq + 1] - q0) * group;
  const int first_pos = p.seq_lens[tile.seq] - rows / group;

  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int row = tile.row0 + r;
    pos_s[r] = row < rows ? first_pos + row / group : -1;
    m_s[r] = -INFINITY;
    l_s[r] = 0.f;
  }
  const T* query = static_cast<const T*>(p.query.data);
  for (int i = threadIdx.x; i < kRows * DP; i += kThreads) {
    const int r = i / DP, d = i % DP, row = tile.row0 + r;
    T q = from_float<T>(0.f);
    if (d < D && row < rows) {
      const int64_t token = q0 + row / group, h = kvh * group + row % group;
      q = query[token * p.query.row_stride + h * p.query.head_stride + d];
    }
    q_s[r][d] = q;
    o_s[r][d] = 0.f;
  }
  __syncthreads();

  const int last = min(kRows, rows - tile.row0) - 1;
  const int hi = pos_s[last];
  const int lo = p.sliding_window > 0 ? max(0, pos_s[0] - p.sliding_window + 1) : 0;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int32_t* table = p.block_tables + tile.seq * p.block_table_stride;
  const int64_t block_elems = static_cast<int64_t>(p.num_kv_heads) * p.block_size * D;
  constexpr int kChunks = DP / 8;  // 16-byte pieces of a row
  const uint4 zero{0u, 0u, 0u, 0u};

  for (int j0 = lo; j0 <= hi; j0 += kKeys) {
    for (int i = threadIdx.x; i < kKeys * kChunks; i += kThreads) {
      const int key = i / kChunks, c = i % kChunks, j = j0 + key;
      uint4 k = zero, v = zero;
      if (j <= hi && c * 8 < D) {
        const int64_t at = table[j / p.block_size] * block_elems +
                           (static_cast<int64_t>(kvh) * p.block_size + j % p.block_size) * D +
                           c * 8;
        k = *reinterpret_cast<const uint4*>(kc + at);
        v = *reinterpret_cast<const uint4*>(vc + at);
      }
      *reinterpret_cast<uint4*>(&k_s[key][c * 8]) = k;
      *reinterpret_cast<uint4*>(&v_s[key][c * 8]) = v;
    }
    __syncthreads();

    {  // S = Q K^T, one 16 x 16 tile per warp
      const int wm = warp / (kKeys / 16), wn = warp % (kKeys / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int k = 0; k < DP; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, &q_s[wm * 16][k], DP);
        wmma::load_matrix_sync(b, &k_s[wn * 16][k], DP);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(&s_s[wm * 16][wn * 16], acc, kKeys, wmma::mem_row_major);
    }
    __syncthreads();

    {  // online softmax: kThreadsPerRow adjacent lanes share a row
      const int r = threadIdx.x / kThreadsPerRow, part = threadIdx.x % kThreadsPerRow;
      const int pos = pos_s[r];
      const int first = p.sliding_window > 0 ? pos - p.sliding_window + 1 : 0;
      const int h = kvh * group + (tile.row0 + r) % group;
      const float m_old = m_s[r];
      float s[kColsPerThread], mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const int c = part * kColsPerThread + i, j = j0 + c;
        float x = -INFINITY;
        if (j <= pos && j >= first) {
          x = s_s[r][c] * p.scale;
          if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
          if (p.alibi_slopes) x += p.alibi_slopes[h] * static_cast<float>(j - pos);
        }
        s[i] = x;
        mx = fmaxf(mx, x);
      }
#pragma unroll
      for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) mx = fmaxf(mx, TM_SHFL_XOR(mx, o));
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const float e = s[i] == -INFINITY ? 0.f : __expf(s[i] - m_new);
        sum += e;
        p_s[r][part * kColsPerThread + i] = from_float<T>(e);
      }
#pragma unroll
      for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) sum += TM_SHFL_XOR(sum, o);
      if (part == 0) {
        const float corr = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
        m_s[r] = m_new;
        l_s[r] = l_s[r] * corr + sum;
        corr_s[r] = corr;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * DP; i += kThreads) o_s[i / DP][i % DP] *= corr_s[i / DP];
    __syncthreads();

    // O += P V, the 16 x 16 output tiles dealt round the warps
    for (int t = warp; t < (kRows / 16) * (DP / 16); t += kWarps) {
      const int rt = t / (DP / 16), ct = t % (DP / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, &o_s[rt * 16][ct * 16], DP, wmma::mem_row_major);
      for (int k = 0; k < kKeys; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, &p_s[rt * 16][k], kKeys);
        wmma::load_matrix_sync(b, &v_s[k][ct * 16], DP);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(&o_s[rt * 16][ct * 16], acc, DP, wmma::mem_row_major);
    }
    __syncthreads();
  }

  T* out = static_cast<T*>(p.out.data);
  for (int i = threadIdx.x; i < kRows * DP; i += kThreads) {
    const int r = i / DP, d = i % DP, row = tile.row0 + r;
    if (d < D && row < rows) {
      const int64_t token = q0 + row / group, h = kvh * group + row % group;
      out[token * p.out.row_stride + h * p.out.head_stride + d] = from_float<T>(o_s[r][d] / l_s[r]);
    }
  }
#endif
}

template <typename T, int DP>
void launch(const PagedAttentionParams& p, int64_t num_tokens, tmStream_t stream) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t tiles = (num_tokens * group + kRows - 1) / kRows + p.num_seqs;  // an upper bound
  const dim3 grid(static_cast<unsigned>(tiles), p.num_kv_heads);
  TM_LAUNCH(grid, kThreads, stream, prefill_attention_kernel<T, DP>)(p);
}

}  // namespace

bool prefill_attention_fits(const PagedAttentionParams& p, int64_t num_tokens) {
  // Attention sinks take the general kernel.
  return num_tokens > p.num_seqs && device_has_tensor_cores() && p.dtype != DType::kFloat32 &&
         p.sinks == nullptr && p.head_size % 16 == 0 && p.head_size <= kMaxHead &&
         p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0;
}

const char* prefill_attention(const PagedAttentionParams& p, int64_t num_tokens, void* stream) {
  auto s = static_cast<tmStream_t>(stream);
  const char* err = dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {  // tensor cores take 16-bit inputs
      if (p.head_size <= 64)
        launch<T, 64>(p, num_tokens, s);
      else
        launch<T, 128>(p, num_tokens, s);
    }
  });
  return err ? err : last_error();
}
#else
bool prefill_attention_fits(const PagedAttentionParams&, int64_t) { return false; }
const char* prefill_attention(const PagedAttentionParams&, int64_t, void*) {
  return "the tiled prefill attention needs WMMA";
}
#endif

}  // namespace tokenmill::gpu
