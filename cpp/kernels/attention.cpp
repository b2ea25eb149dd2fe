// Paged attention on the CPU. One work item is (sequence, kv head, tile of
// query tokens); it handles every query head of the GQA group at once so each
// cached K/V block is read once per item. Online softmax over KV blocks keeps
// float32 running max, sum and accumulator per query row.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_decode.h"
#include "attention_tile.h"
#include "common.h"

namespace tokenmill::cpu {
namespace {

constexpr int kQueryTile = 16;

#define TM_INLINE __attribute__((always_inline)) inline

TM_INLINE void scale_vec(float* y, float a, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] *= a;
}

struct Scratch {
  std::vector<float> q, acc, m, l, k, v, s, kt;
  Bf16TileScratch bf16_tile;
};

// Points `dst` at a float32 view of n*D cache elements: the cache itself for
// float caches, else a converted copy in `buf`.
template <typename T>
TM_INLINE const float* as_float(const T* src, int64_t count, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    float* dst = buf.data();
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]);
    return dst;
  }
}

// HEAD is the head size when known at compile time (0: p.head_size), which
// lets the per-token loops unroll completely.
template <typename T, int HEAD>
TM_INLINE void attend_tile(const PagedAttentionParams& p, int seq, int kvh, int q_begin, int q_end,
                           Scratch& w) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int D = HEAD ? HEAD : p.head_size;
  const int bs = p.block_size;
  const int group = p.num_heads / p.num_kv_heads;
  const int q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
  const int ctx = p.seq_lens[seq];
  const int first_pos = ctx - q_len;  // absolute position of query 0
  const int rows = (q_end - q_begin) * group;
  w.q.resize(static_cast<size_t>(rows) * D);
  w.acc.assign(static_cast<size_t>(rows) * D, 0.f);
  w.m.assign(rows, kNegInf);
  w.l.assign(rows, 0.f);
  if (p.sinks)  // the sink's term: exp(sink - m) = 1 with m = sink
    for (int r = 0; r < rows; ++r) {
      w.m[r] = p.sinks[kvh * group + r % group];
      w.l[r] = 1.f;
    }
  w.k.resize(static_cast<size_t>(bs) * D);
  w.v.resize(static_cast<size_t>(bs) * D);
  w.s.resize(static_cast<size_t>(rows) * bs);
  w.kt.resize(static_cast<size_t>(bs) * D);

  const T* query = static_cast<const T*>(p.query.data);
  for (int qi = q_begin; qi < q_end; ++qi) {
    const int64_t tok = p.query_start_loc[seq] + qi;
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      float* dst = &w.q[static_cast<size_t>((qi - q_begin) * group + g) * D];
      const T* src = query + tok * p.query.row_stride + h * p.query.head_stride;
      for (int d = 0; d < D; ++d) dst[d] = to_float(src[d]) * p.scale;
    }
  }

  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const TileBlocks blocks = tile_blocks(p, seq, kvh, q_begin, q_end);
  for (int b = blocks.first; b < blocks.end; ++b) {
    const int64_t base = blocks.offset(b);
    const int t0 = b * bs, n = blocks.rows(b);
    const float* kb = as_float(kc + base, static_cast<int64_t>(n) * D, w.k);
    const float* vb = as_float(vc + base, static_cast<int64_t>(n) * D, w.v);
    tile_scores(w.q.data(), rows, D, kb, n, w.s.data(), bs, w.kt.data());
    for (int r = 0; r < rows; ++r) {
      const int pos = first_pos + q_begin + r / group;
      const int h = kvh * group + r % group;
      float* s = &w.s[static_cast<size_t>(r) * bs];
      const bool masked =
          t0 + n - 1 > pos || (p.sliding_window > 0 && pos - t0 >= p.sliding_window);
      if (p.softcap > 0.f)
        for (int t = 0; t < n; ++t) s[t] = p.softcap * std::tanh(s[t] / p.softcap);
      if (p.alibi_slopes)
        for (int t = 0; t < n; ++t) s[t] += p.alibi_slopes[h] * (t0 + t - pos);
      if (masked)
        for (int t = 0; t < n; ++t) {
          const int kpos = t0 + t;
          if (kpos > pos || (p.sliding_window > 0 && pos - kpos >= p.sliding_window))
            s[t] = kNegInf;
        }
      float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
      for (int t = 0; t < n; ++t) block_max = s[t] > block_max ? s[t] : block_max;
      if (block_max == kNegInf) {
        for (int t = 0; t < n; ++t) s[t] = 0.f;
        continue;
      }
      float& m = w.m[r];
      float* acc = &w.acc[static_cast<size_t>(r) * D];
      if (block_max > m) {
        const float correction = fast_exp(m - block_max);
        scale_vec(acc, correction, D);
        w.l[r] *= correction;
        m = block_max;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int t = 0; t < n; ++t) {
        s[t] = fast_exp(s[t] - m);
        sum += s[t];
      }
      w.l[r] += sum;
    }
    tile_values(w.s.data(), bs, rows, vb, n, D, w.acc.data());
  }

  T* out = static_cast<T*>(p.out.data);
  for (int r = 0; r < rows; ++r) {
    const int64_t tok = p.query_start_loc[seq] + q_begin + r / group;
    const int h = kvh * group + r % group;
    float* acc = &w.acc[static_cast<size_t>(r) * D];
    scale_vec(acc, w.l[r] > 0.f ? 1.f / w.l[r] : 0.f, D);
    store_float(out + tok * p.out.row_stride + h * p.out.head_stride, acc, D);
  }
}

template <typename T>
TM_INLINE void attend_typed(const PagedAttentionParams& p, int seq, int kvh, int q_begin, int q_end,
                            Scratch& w) {
  switch (p.head_size) {
    case 64:
      attend_tile<T, 64>(p, seq, kvh, q_begin, q_end, w);
      break;
    case 80:
      attend_tile<T, 80>(p, seq, kvh, q_begin, q_end, w);
      break;
    case 96:
      attend_tile<T, 96>(p, seq, kvh, q_begin, q_end, w);
      break;
    case 128:
      attend_tile<T, 128>(p, seq, kvh, q_begin, q_end, w);
      break;
    case 256:
      attend_tile<T, 256>(p, seq, kvh, q_begin, q_end, w);
      break;
    default:
      attend_tile<T, 0>(p, seq, kvh, q_begin, q_end, w);
      break;
  }
}

TM_MULTIVERSION void attend_item(const PagedAttentionParams& p, int seq, int kvh, int q_begin,
                                 int q_end, Scratch& w) {
  switch (p.dtype) {
    case DType::kFloat32:
      attend_typed<float>(p, seq, kvh, q_begin, q_end, w);
      break;
    case DType::kBFloat16:
      if (prefill_tile_bf16_supported(p))
        prefill_tile_bf16(p, seq, kvh, q_begin, q_end, w.bf16_tile);
      else
        attend_typed<bf16>(p, seq, kvh, q_begin, q_end, w);
      break;
#if defined(__FLT16_MAX__)
    case DType::kFloat16:
      attend_typed<f16>(p, seq, kvh, q_begin, q_end, w);
      break;
#endif
    default:
      break;
  }
}

// A unit of work: query rows [q_begin, q_end) of one sequence for KV heads
// [kvh0, kvh1) (several only for decode), or for a decode item split over its
// context, the KV blocks [block_begin, block_end) into partials[partial]. A
// decode item attends the single row q_begin.
struct Item {
  int seq, kvh0, kvh1, q_begin, q_end;
  int block_begin = 0, block_end = std::numeric_limits<int>::max(), partial = -1;
  bool decode = false;
};

// Decode items whose context was split, and where their partials start.
struct Split {
  int seq, row, kvh, first, count;
};

// Query row `row` of sequence `seq` as a one-token sequence of its own.
struct RowView {
  PagedAttentionParams p;
  int32_t starts[2], len;
  RowView(const PagedAttentionParams& src, int seq, int row) : p(src) {
    const int q_len = src.query_start_loc[seq + 1] - src.query_start_loc[seq];
    starts[0] = src.query_start_loc[seq] + row;
    starts[1] = starts[0] + 1;
    len = src.seq_lens[seq] - q_len + row + 1;
    p.block_tables = src.block_tables + seq * src.block_table_stride;
    p.seq_lens = &len;
    p.query_start_loc = starts;
    p.num_seqs = 1;
  }
  RowView(const RowView&) = delete;
  RowView& operator=(const RowView&) = delete;
};

// Many decode sequences: one item per sequence, all its KV heads, so that an
// item streams whole cache blocks (measured here: 25% faster reads than
// per-head slices of them). Few: one item per KV head. Either way a decode
// row's context is attended in parts of kPartTokens, each a softmax of its
// own, merged in order: the row's output is a function of its context alone,
// whatever else the batch holds (and a lone long context gives every thread
// work).
constexpr int kItemsPerThread = 4;
constexpr int kPartTokens = 512;

int context_parts(const PagedAttentionParams& p, int seq) {
  const int blocks = (p.seq_lens[seq] + p.block_size - 1) / p.block_size;
  const int part_blocks = std::max(1, kPartTokens / p.block_size);
  return (blocks + part_blocks - 1) / part_blocks;
}

}  // namespace

void paged_attention(const PagedAttentionParams& p) {
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0)
    throw std::invalid_argument("num_heads must be a multiple of num_kv_heads");
  dispatch_dtype(p.dtype, [](auto) {});  // rejects unsupported dtypes
  const bool fast = decode_fast_path_supported(p);
  auto q_len = [&](int s) { return p.query_start_loc[s + 1] - p.query_start_loc[s]; };
  // Decoding sequences (with drafts, several query tokens) attend each token
  // through the decode path on its own.
  auto decodes = [&](int s) { return fast && (q_len(s) == 1 || s < p.num_decode_seqs); };
  const int threads = omp_get_max_threads();
  const bool whole_seqs = fast && p.num_seqs >= kItemsPerThread * threads;
  std::vector<Item> items;
  std::vector<Split> splits;
  int num_partials = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    if (!decodes(s)) {
      for (int h = 0; h < p.num_kv_heads; ++h)
        for (int q0 = 0; q0 < q_len(s); q0 += kQueryTile)
          items.push_back({s, h, h + 1, q0, std::min(q_len(s), q0 + kQueryTile)});
      continue;
    }
    for (int r = 0; r < q_len(s); ++r) {
      Item row{s, 0, p.num_kv_heads, r, r + 1};
      row.decode = true;
      const RowView v(p, s, r);
      const int parts = context_parts(v.p, 0);
      if (whole_seqs && parts == 1) {
        items.push_back(row);
        continue;
      }
      const int blocks = (v.len + p.block_size - 1) / p.block_size;
      for (int h = 0; h < p.num_kv_heads; ++h) {
        row.kvh0 = h;
        row.kvh1 = h + 1;
        if (parts == 1) {
          items.push_back(row);
          continue;
        }
        splits.push_back({s, r, h, num_partials, parts});
        for (int i = 0; i < parts; ++i) {
          row.block_begin = blocks * i / parts;
          row.block_end = blocks * (i + 1) / parts;
          row.partial = num_partials++;
          items.push_back(row);
        }
        row.block_begin = 0;
        row.block_end = std::numeric_limits<int>::max();
        row.partial = -1;
      }
    }
  }
  std::vector<DecodePartial> partials(num_partials);
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_splits = static_cast<int64_t>(splits.size());
#pragma omp parallel
  {
    Scratch w;
    DecodeScratch dw;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      const Item& it = items[i];
      DecodePartial* partial = it.partial < 0 ? nullptr : &partials[it.partial];
      if (it.decode) {
        const RowView v(p, it.seq, it.q_begin);
        if (decode_fast_path(v.p, 0, it.kvh0, it.kvh1, it.block_begin, it.block_end, dw, partial))
          continue;
      }
      for (int h = it.kvh0; h < it.kvh1; ++h) attend_item(p, it.seq, h, it.q_begin, it.q_end, w);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_splits; ++i) {
      const Split& sp = splits[i];
      const RowView v(p, sp.seq, sp.row);
      decode_merge(v.p, 0, sp.kvh, &partials[sp.first], sp.count);
    }
  }
}

}  // namespace tokenmill::cpu
