// Paged attention for decode batches and what the tiled prefill kernel
// (prefill_attention_kernels.cu) does not take: every new query token of
// every sequence attends causally to its paged context. One thread block serves one query
// token, one KV head and up to kMaxGroup of the query heads that share it, so
// each key and value row is read once for the whole group (GQA/MQA). The
// block's warps take interleaved keys, each keeping an online softmax, and
// merge at the end. Long contexts with few query tokens are split across
// blocks as well; a second kernel merges the splits' partial results.
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxGroup = 8;
constexpr int kMaxHead = 256;
constexpr int kSplitKeys = 512;  // the smallest split worth a block of its own
constexpr int kTargetBlocks = 1024;

struct Split {
  int count;   // splits per query token
  int keys;    // key positions per split, a multiple of the block size
  float* max;  // [num_tokens, num_heads, count]
  float* sum;  // [num_tokens, num_heads, count]
  float* acc;  // [num_tokens, num_heads, count, head_size]
};

__device__ int sequence_of(const int32_t* query_start_loc, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {  // the last sequence starting at or before the token
    const int mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= token)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// E: head elements per lane (head_size <= E * kWarpSize).
// Joins head h's sink to a softmax with running max mx, denominator total and numerator value.
__device__ __forceinline__ void add_sink(const PagedAttentionParams& p, int h, float& mx,
                                         float& total, float& value) {
  if (p.sinks == nullptr) return;
  const float m = fmaxf(mx, p.sinks[h]);
  const float f = mx == -INFINITY ? 0.f : __expf(mx - m);
  total = total * f + __expf(p.sinks[h] - m);
  value *= f;
  mx = m;
}

template <typename T, int E>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(PagedAttentionParams p, int chunks, Split split) {
  __shared__ float q_s[kMaxGroup][E * kWarpSize];
  __shared__ float max_s[kWarps][kMaxGroup], sum_s[kWarps][kMaxGroup];
  __shared__ float acc_s[kWarps][kMaxGroup][E * kWarpSize];

  const int token = blockIdx.x, kvh = blockIdx.y;
  const int chunk = blockIdx.z % chunks, part = blockIdx.z / chunks;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = p.head_size, bs = p.block_size;
  const int group = p.num_heads / p.num_kv_heads;
  const int h0 = kvh * group + chunk * kMaxGroup;
  const int G = min(kMaxGroup, group - chunk * kMaxGroup);

  const int seq = sequence_of(p.query_start_loc, p.num_seqs, token);
  const int q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
  const int pos = p.seq_lens[seq] - q_len + (token - p.query_start_loc[seq]);
  int first = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
  first = max(first, part * split.keys);
  const int last = min(pos, (part + 1) * split.keys - 1);

  const T* query = static_cast<const T*>(p.query.data) + token * p.query.row_stride;
  for (int i = threadIdx.x; i < kMaxGroup * E * kWarpSize; i += kThreads) {
    const int g = i / (E * kWarpSize), d = i % (E * kWarpSize);
    q_s[g][d] =
        g < G && d < D ? to_float(query[(h0 + g) * p.query.head_stride + d]) * p.scale : 0.f;
  }
  __syncthreads();

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][E];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }

  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int64_t block_elems = static_cast<int64_t>(p.num_kv_heads) * bs * D;
  for (int j = first + warp; j <= last; j += kWarps) {
    const int64_t row = table[j / bs] * block_elems + (static_cast<int64_t>(kvh) * bs + j % bs) * D;
    float k[E], v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane + e * kWarpSize;
      k[e] = d < D ? to_float(kc[row + d]) : 0.f;
      v[e] = d < D ? to_float(vc[row + d]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < G) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s += q_s[g][lane + e * kWarpSize] * k[e];
        s = warp_sum(s);
        if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
        if (p.alibi_slopes) s += p.alibi_slopes[h0 + g] * static_cast<float>(j - pos);
        const float m_new = fmaxf(m[g], s);
        const float correction = __expf(m[g] - m_new), weight = __expf(s - m_new);
        l[g] = l[g] * correction + weight;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * correction + weight * v[e];
        m[g] = m_new;
      }
    }
  }

#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
    for (int e = 0; e < E; ++e) acc_s[warp][g][lane + e * kWarpSize] = acc[g][e];
    if (lane == 0) {
      max_s[warp][g] = m[g];
      sum_s[warp][g] = l[g];
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out.data) + token * p.out.row_stride;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, max_s[w][g]);
    float total = 0.f, value = 0.f;
    if (mx != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float f = __expf(max_s[w][g] - mx);
        total += sum_s[w][g] * f;
        value += acc_s[w][g][d] * f;
      }
    }
    const int h = h0 + g;
    if (split.count == 1) {
      add_sink(p, h, mx, total, value);
      out[h * p.out.head_stride + d] = from_float<T>(value / total);
    } else {
      const int64_t at = (static_cast<int64_t>(token) * p.num_heads + h) * split.count + part;
      split.acc[at * D + d] = value;
      if (d == 0) {
        split.max[at] = mx;
        split.sum[at] = total;
      }
    }
  }
}

template <typename T>
__global__ void merge_splits_kernel(PagedAttentionParams p, Split split) {
  const int token = blockIdx.x, h = blockIdx.y, D = p.head_size;
  const int64_t at = (static_cast<int64_t>(token) * p.num_heads + h) * split.count;
  float mx = -INFINITY;
  for (int s = 0; s < split.count; ++s) mx = fmaxf(mx, split.max[at + s]);
  float total = 0.f;
  for (int s = 0; s < split.count; ++s)
    if (split.max[at + s] != -INFINITY) total += split.sum[at + s] * __expf(split.max[at + s] - mx);
  T* out = static_cast<T*>(p.out.data) + token * p.out.row_stride + h * p.out.head_stride;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float value = 0.f;
    for (int s = 0; s < split.count; ++s)
      if (split.max[at + s] != -INFINITY)
        value += split.acc[(at + s) * D + d] * __expf(split.max[at + s] - mx);
    float m = mx, sum = total;
    add_sink(p, h, m, sum, value);
    out[d] = from_float<T>(value / sum);
  }
}

template <typename T, int E>
void launch(const PagedAttentionParams& p, int tokens, Split split, tmStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks = (group + kMaxGroup - 1) / kMaxGroup;
  const dim3 grid(tokens, p.num_kv_heads, chunks * split.count);
  TM_LAUNCH(grid, kThreads, stream, attention_kernel<T, E>)(p, chunks, split);
  if (split.count > 1)
    TM_LAUNCH(dim3(tokens, p.num_heads), 128, stream, merge_splits_kernel<T>)(p, split);
}

}  // namespace

int paged_attention_splits(const PagedAttentionParams& p, int64_t num_tokens) {
  const int64_t max_keys = p.block_table_stride * p.block_size;
  const int64_t chunks = (p.num_heads / p.num_kv_heads + kMaxGroup - 1) / kMaxGroup;
  const int64_t blocks = num_tokens * p.num_kv_heads * chunks;
  if (prefill_attention_fits(p, num_tokens)) return 1;
  if (num_tokens == 0 || max_keys <= kSplitKeys || blocks >= kTargetBlocks) return 1;
  const int64_t by_length = (max_keys + kSplitKeys - 1) / kSplitKeys;
  const int64_t by_occupancy = (kTargetBlocks + blocks - 1) / blocks;
  return static_cast<int>(by_length < by_occupancy ? by_length : by_occupancy);
}

int64_t paged_attention_workspace_floats(const PagedAttentionParams& p, int64_t num_tokens,
                                         int splits) {
  return splits == 1 ? 0 : num_tokens * p.num_heads * splits * (p.head_size + 2);
}

const char* paged_attention(const PagedAttentionParams& p, int64_t num_tokens, int splits,
                            float* workspace, void* stream) {
  if (num_tokens == 0) return nullptr;
  if (p.head_size > kMaxHead) return "head_size above 256 is not supported on the GPU";
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads)
    return "num_heads must be a multiple of num_kv_heads";
  if (prefill_attention_fits(p, num_tokens)) return prefill_attention(p, num_tokens, stream);
  Split split{splits, 1 << 30, nullptr, nullptr, nullptr};  // one split: every key
  if (splits > 1) {
    const int64_t per_split = (p.block_table_stride * p.block_size + splits - 1) / splits;
    split.keys = static_cast<int>((per_split + p.block_size - 1) / p.block_size * p.block_size);
    const int64_t cells = num_tokens * p.num_heads * splits;
    split.max = workspace;
    split.sum = workspace + cells;
    split.acc = workspace + 2 * cells;
  }
  const int tokens = static_cast<int>(num_tokens);
  const int lanes_needed = (p.head_size + kWarpSize - 1) / kWarpSize;
  auto s = static_cast<tmStream_t>(stream);
  const char* err = dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (lanes_needed <= 1)
      launch<T, 1>(p, tokens, split, s);
    else if (lanes_needed <= 2)
      launch<T, 2>(p, tokens, split, s);
    else if (lanes_needed <= 4)
      launch<T, 4>(p, tokens, split, s);
    else
      launch<T, 8 * 32 / kWarpSize>(p, tokens, split, s);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
