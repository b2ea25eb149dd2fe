// Decode attention (one query token per sequence) with AVX2 + FMA intrinsics,
// for head sizes 64 and 128 and up to 8 query heads per KV head. Each key and
// value row is loaded and widened once and used by every head of the group;
// per-head accumulators live in registers. A long context may be split into
// parts that threads attend separately and decode_merge then combines.
#include "attention_decode.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <algorithm>
#include <limits>

#include "avx2.h"

namespace tokenmill::cpu {
namespace {

// Chunks of eight head dims whose accumulators, for all G heads, fit in
// twelve registers: the largest divisor of C with C_group * G <= 12.
constexpr int chunk_group(int C, int G) {
  int best = 1;
  for (int d = 1; d <= C; ++d)
    if (C % d == 0 && d * G <= 12) best = d;
  return best;
}

// Normalises G heads' accumulators and stores them as the item's output.
template <typename T>
void store_heads(const PagedAttentionParams& p, int seq, int kvh, int G, int D, const float* l,
                 const float* acc) {
  T* out = static_cast<T*>(p.out.data);
  const int64_t tok = p.query_start_loc[seq];
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    T* dst = out + tok * p.out.row_stride + (kvh * G + g) * p.out.head_stride;
    for (int d = 0; d < D; ++d) dst[d] = from_float<T>(acc[g * D + d] * inv);
  }
}

// One KV block of one KV head: scores of its n rows for the G query heads,
// the online softmax update of `state`, and the weighted values. The first
// `masked` rows lie before the sliding window. While scoring row t, row t of
// the next block (nk, nv) is fetched: blocks sit anywhere in the cache, out of
// the hardware prefetcher's reach, and spreading the misses out keeps them
// from flooding the load queue at once. The rows are read once per step: a
// non-temporal fetch keeps them from evicting the outer levels (measured
// 15-20% faster than into every level).
template <typename T, int D, int G>
__attribute__((target("avx2,fma"), always_inline)) inline void attend_block(
    const float* q, const T* kb, const T* vb, const char* nk, const char* nv, int n, int masked,
    int bs, float* s, DecodePartial& state) {
  constexpr int C = D / 8;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float *acc = state.acc, *m = state.m, *l = state.l;
  constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  // Scores: each key chunk is widened once and used by every head.
  for (int t = 0; t < n; ++t) {
    if (nk)
      for (int off = t * kRowBytes; off < (t + 1) * kRowBytes; off += 64) {
        _mm_prefetch(nk + off, _MM_HINT_NTA);
        _mm_prefetch(nv + off, _MM_HINT_NTA);
      }
    __m256 a0[G], a1[G];
    for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
    const T* kt = kb + t * D;
    for (int c = 0; c < C; c += 2) {
      const __m256 k0 = load8(kt + c * 8), k1 = load8(kt + c * 8 + 8);
      for (int g = 0; g < G; ++g) {
        a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c * 8), k0, a0[g]);
        a1[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c * 8 + 8), k1, a1[g]);
      }
    }
    for (int g = 0; g < G; ++g) s[g * bs + t] = hsum(_mm256_add_ps(a0[g], a1[g]));
  }
  for (int t = 0; t < masked; ++t)
    for (int g = 0; g < G; ++g) s[g * bs + t] = kNegInf;
  // Online softmax per head.
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * bs;
    const int n8 = n / 8 * 8;
    __m256 vmax = _mm256_set1_ps(kNegInf);
    for (int t = 0; t < n8; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sg + t));
    float block_max = hmax(vmax);
    for (int t = n8; t < n; ++t) block_max = std::max(block_max, sg[t]);
    if (block_max > m[g]) {
      const float corr = fast_exp(m[g] - block_max);
      const __m256 cv = _mm256_set1_ps(corr);
      for (int c = 0; c < C; ++c)
        _mm256_storeu_ps(acc + g * D + c * 8,
                         _mm256_mul_ps(_mm256_loadu_ps(acc + g * D + c * 8), cv));
      l[g] *= corr;
      m[g] = block_max;
    }
    const __m256 mv = _mm256_set1_ps(m[g]);
    __m256 vsum = _mm256_setzero_ps();
    for (int t = 0; t < n8; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mv));
      _mm256_storeu_ps(sg + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (int t = n8; t < n; ++t) {
      sg[t] = fast_exp(sg[t] - m[g]);
      sum += sg[t];
    }
    l[g] += sum;
  }
  // Values: each value chunk is widened once and used by every head; the
  // accumulators of a group of chunks stay in registers across the tokens.
  constexpr int CG = chunk_group(C, G);
  for (int c0 = 0; c0 < C; c0 += CG) {
    __m256 a[G][CG];
    for (int g = 0; g < G; ++g)
      for (int cc = 0; cc < CG; ++cc) a[g][cc] = _mm256_loadu_ps(acc + g * D + (c0 + cc) * 8);
    for (int t = 0; t < n; ++t) {
      __m256 pg[G];
      for (int g = 0; g < G; ++g) pg[g] = _mm256_broadcast_ss(s + g * bs + t);
      for (int cc = 0; cc < CG; ++cc) {
        const __m256 v = load8(vb + t * D + (c0 + cc) * 8);
        for (int g = 0; g < G; ++g) a[g][cc] = _mm256_fmadd_ps(pg[g], v, a[g][cc]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int cc = 0; cc < CG; ++cc) _mm256_storeu_ps(acc + g * D + (c0 + cc) * 8, a[g][cc]);
  }
}

// KV heads [kvh0, kvh1) of one sequence's single query token over KV blocks
// [block_begin, block_end). A block's heads lie next to each other in the
// cache and are attended one after another, so an item of several heads
// reads whole blocks rather than slices of them.
template <typename T, int D, int G>
__attribute__((target("avx2,fma"))) void decode_item(const PagedAttentionParams& p, int seq,
                                                     int kvh0, int kvh1, int block_begin,
                                                     int block_end, DecodeScratch& w,
                                                     DecodePartial* partial) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int bs = p.block_size, heads = kvh1 - kvh0;
  const int pos = p.seq_lens[seq] - 1;
  const int64_t tok = p.query_start_loc[seq];
  w.q.resize(static_cast<size_t>(heads) * G * D);
  if (!partial) w.states.resize(heads);
  auto state_of = [&](int h) -> DecodePartial& { return partial ? *partial : w.states[h]; };
  const T* query = static_cast<const T*>(p.query.data);
  for (int h = 0; h < heads; ++h) {
    DecodePartial& st = state_of(h);
    for (int g = 0; g < G; ++g) {
      const T* src = query + tok * p.query.row_stride + ((kvh0 + h) * G + g) * p.query.head_stride;
      for (int d = 0; d < D; ++d) w.q[(h * G + g) * D + d] = to_float(src[d]) * p.scale;
      std::fill(st.acc + g * D, st.acc + (g + 1) * D, 0.f);
      st.m[g] = kNegInf;
      st.l[g] = 0.f;
    }
  }
  const int lo = p.sliding_window > 0 ? std::max(0, pos - p.sliding_window + 1) : 0;
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int64_t block_elems = static_cast<int64_t>(p.num_kv_heads) * bs * D;
  const int64_t head_elems = static_cast<int64_t>(bs) * D;
  const int b_end = std::min(block_end, pos / bs + 1);
  for (int b = std::max(block_begin, lo / bs); b < b_end; ++b) {
    const int n = std::min(bs, pos + 1 - b * bs);
    const int masked = std::max(0, lo - b * bs);
    const bool has_next = b + 1 < b_end;
    for (int h = 0; h < heads; ++h) {
      const int64_t off = table[b] * block_elems + (kvh0 + h) * head_elems;
      const int64_t next = has_next ? table[b + 1] * block_elems + (kvh0 + h) * head_elems : 0;
      attend_block<T, D, G>(w.q.data() + h * G * D, kc + off, vc + off,
                            has_next ? reinterpret_cast<const char*>(kc + next) : nullptr,
                            has_next ? reinterpret_cast<const char*>(vc + next) : nullptr, n,
                            masked, bs, w.s, state_of(h));
    }
  }
  if (!partial)
    for (int h = 0; h < heads; ++h)
      store_heads<T>(p, seq, kvh0 + h, G, D, w.states[h].l, w.states[h].acc);
}

template <typename T, int D>
bool dispatch_group(const PagedAttentionParams& p, int seq, int kvh0, int kvh1, int b0, int b1,
                    DecodeScratch& w, DecodePartial* partial) {
  switch (p.num_heads / p.num_kv_heads) {
    case 1:
      decode_item<T, D, 1>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 2:
      decode_item<T, D, 2>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 3:
      decode_item<T, D, 3>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 4:
      decode_item<T, D, 4>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 5:
      decode_item<T, D, 5>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 6:
      decode_item<T, D, 6>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 7:
      decode_item<T, D, 7>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    case 8:
      decode_item<T, D, 8>(p, seq, kvh0, kvh1, b0, b1, w, partial);
      return true;
    default:
      return false;
  }
}

template <typename T>
bool dispatch_head(const PagedAttentionParams& p, int seq, int kvh0, int kvh1, int b0, int b1,
                   DecodeScratch& w, DecodePartial* partial) {
  switch (p.head_size) {
    case 64:
      return dispatch_group<T, 64>(p, seq, kvh0, kvh1, b0, b1, w, partial);
    case 128:
      return dispatch_group<T, 128>(p, seq, kvh0, kvh1, b0, b1, w, partial);
    default:
      return false;
  }
}

}  // namespace

bool decode_fast_path_supported(const PagedAttentionParams& p) {
  const int group = p.num_heads / p.num_kv_heads;
  return cpu_has_avx2_fma() && p.softcap == 0.f && p.alibi_slopes == nullptr && group >= 1 &&
         group <= 8 && (p.head_size == 64 || p.head_size == 128) &&
         p.block_size <= kMaxDecodeBlock &&
         (p.dtype == DType::kFloat32 || p.dtype == DType::kBFloat16);
}

bool decode_fast_path(const PagedAttentionParams& p, int seq, int kvh0, int kvh1, int block_begin,
                      int block_end, DecodeScratch& w, DecodePartial* partial) {
  if (p.dtype == DType::kFloat32)
    return dispatch_head<float>(p, seq, kvh0, kvh1, block_begin, block_end, w, partial);
  return dispatch_head<bf16>(p, seq, kvh0, kvh1, block_begin, block_end, w, partial);
}

void decode_merge(const PagedAttentionParams& p, int seq, int kvh, const DecodePartial* parts,
                  int count) {
  const int G = p.num_heads / p.num_kv_heads, D = p.head_size;
  DecodePartial total;
  for (int g = 0; g < G; ++g) {
    float m = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < count; ++i) m = std::max(m, parts[i].m[g]);
    total.l[g] = 0.f;
    std::fill(total.acc + g * D, total.acc + (g + 1) * D, 0.f);
    for (int i = 0; i < count; ++i) {
      if (parts[i].l[g] == 0.f) continue;  // a part wholly outside the sliding window
      const float c = fast_exp(parts[i].m[g] - m);
      total.l[g] += parts[i].l[g] * c;
      for (int d = 0; d < D; ++d) total.acc[g * D + d] += parts[i].acc[g * D + d] * c;
    }
  }
  if (p.dtype == DType::kFloat32)
    store_heads<float>(p, seq, kvh, G, D, total.l, total.acc);
  else
    store_heads<bf16>(p, seq, kvh, G, D, total.l, total.acc);
}

}  // namespace tokenmill::cpu

#else

namespace tokenmill::cpu {
bool decode_fast_path_supported(const PagedAttentionParams&) { return false; }
bool decode_fast_path(const PagedAttentionParams&, int, int, int, int, int, DecodeScratch&,
                      DecodePartial*) {
  return false;
}
void decode_merge(const PagedAttentionParams&, int, int, const DecodePartial*, int) {}
}  // namespace tokenmill::cpu

#endif
