// Decode attention (one query token per sequence) with AVX2 + FMA intrinsics,
// for head sizes 64, 128 and 256 and up to 8 query heads per KV head. Each key and
// value row is loaded and widened once and used by every head of the group;
// per-head accumulators live in registers. A long context may be split into
// parts that threads attend separately and decode_merge then combines.
#include "attention_decode.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <algorithm>
#include <limits>
#include <type_traits>

#include "avx2.h"

namespace tokenmill::cpu {
namespace {

// A 16-dim chunk of a key row as two float32 vectors. bfloat16: one 32-byte
// load whose shifted and masked halves hold the even and the odd dims (two
// instructions for sixteen values); float32: dims 0-7 and 8-15. The query is
// stored in the same order (key_order).
TM_AVX2 void load16(const bf16* p, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
TM_AVX2 void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}

// Where dim d of the query sits in load16's order.
template <typename T>
constexpr int key_order(int d) {
  if constexpr (std::is_same_v<T, float>) return d;
  const int i = d % 16;
  return d - i + (i % 2 ? 8 + i / 2 : i / 2);
}

// Key rows scored together: their accumulators for all G heads fit in twelve registers.
constexpr int token_group(int G) { return G <= 3 ? 4 : G <= 6 ? 2 : 1; }

// Chunks of eight head dims whose value accumulators, for all G heads, fit
// in twelve registers: the largest divisor of C with C_group * G <= 12.
constexpr int chunk_group(int C, int G) {
  int best = 1;
  for (int d = 1; d <= C; ++d)
    if (C % d == 0 && d * G <= 12) best = d;
  return best;
}

// The eight-lane sums of TT accumulators, as TT adjacent floats at s.
template <int TT>
TM_AVX2 void store_sums(const __m256* a, float* s) {
  if constexpr (TT == 4) {
    const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
  } else if constexpr (TT == 2) {
    const __m256 x = _mm256_hadd_ps(a[0], a[1]);
    const __m128 y = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    _mm_storel_pi(reinterpret_cast<__m64*>(s), _mm_hadd_ps(y, y));
  } else {
    s[0] = hsum(a[0]);
  }
}

// Scores of key rows [t0, t0 + TT) for G query heads into s[g * stride + t].
template <typename T, int D, int G, int TT>
TM_AVX2 void score_rows(const float* q, const T* rows, int t0, int stride, float* s) {
  __m256 acc[G][TT];
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < TT; ++t) acc[g][t] = _mm256_setzero_ps();
  for (int c = 0; c < D; c += 16)
    for (int t = 0; t < TT; ++t) {
      __m256 ka, kb;
      load16(rows + (t0 + t) * D + c, ka, kb);
      for (int g = 0; g < G; ++g) {
        acc[g][t] = _mm256_fmadd_ps(ka, _mm256_loadu_ps(q + g * D + c), acc[g][t]);
        acc[g][t] = _mm256_fmadd_ps(kb, _mm256_loadu_ps(q + g * D + c + 8), acc[g][t]);
      }
    }
  for (int g = 0; g < G; ++g) store_sums<TT>(acc[g], s + g * stride + t0);
}

// Scores of a block's n key rows, fetching the block's value rows and the
// next block's key rows (nk; null for none) meanwhile: blocks sit anywhere in
// the cache, out of the hardware prefetcher's reach, and spreading the misses
// out keeps them from flooding the load queue at once. Both go to L2 only:
// into L1 the fetches stall on its few miss buffers (256 sequences x 340 keys
// x 30 layers, blocks scattered: 113-120 ms a step against 157-167 ms with
// keys fetched non-temporally and values into L1).
template <typename T, int D, int G>
TM_AVX2 void score_block(const float* q, const T* kb, const T* vb, const char* nk, int n,
                         int stride, float* s) {
  constexpr int TT = token_group(G);
  constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  const char* v = reinterpret_cast<const char*>(vb);
  int t = 0;
  for (; t + TT <= n; t += TT) {
    for (int off = t * kRowBytes; off < (t + TT) * kRowBytes; off += 64) {
      if (nk) _mm_prefetch(nk + off, _MM_HINT_T1);
      _mm_prefetch(v + off, _MM_HINT_T1);
    }
    score_rows<T, D, G, TT>(q, kb, t, stride, s);
  }
  for (; t < n; ++t) {
    for (int off = t * kRowBytes; off < (t + 1) * kRowBytes; off += 64) {
      if (nk) _mm_prefetch(nk + off, _MM_HINT_T1);
      _mm_prefetch(v + off, _MM_HINT_T1);
    }
    score_rows<T, D, G, 1>(q, kb, t, stride, s);
  }
}

// The online softmax update of one head over a round's n scores: rescales
// the head's accumulator to a new maximum and turns the scores into weights.
template <int D>
TM_AVX2 void softmax_round(float* s, int n, float& m, float& l, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int n8 = n / 8 * 8;
  __m256 vmax = _mm256_set1_ps(kNegInf);
  for (int r = 0; r < n8; r += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + r));
  float round_max = hmax(vmax);
  for (int r = n8; r < n; ++r) round_max = std::max(round_max, s[r]);
  if (round_max > m) {
    const __m256 cv = _mm256_set1_ps(fast_exp(m - round_max));
    for (int c = 0; c < D; c += 8)
      _mm256_storeu_ps(acc + c, _mm256_mul_ps(_mm256_loadu_ps(acc + c), cv));
    l *= fast_exp(m - round_max);
    m = round_max;
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  for (int r = 0; r < n8; r += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + r), mv));
    _mm256_storeu_ps(s + r, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (int r = n8; r < n; ++r) {
    s[r] = fast_exp(s[r] - m);
    sum += s[r];
  }
  l += sum;
}

// acc[g] += sum over the round's rows r of s[g * stride + r] * v[r]: each
// value chunk is widened once and used by every head, and the accumulators
// of a group of chunks stay in registers across all the round's rows.
template <typename T, int D, int G>
TM_AVX2 void accumulate_values(const float* s, int stride, const T* const* blocks, int num_blocks,
                               int bs, int last_rows, float* acc) {
  constexpr int C = D / 8, CG = chunk_group(C, G);
  for (int c0 = 0; c0 < C; c0 += CG) {
    __m256 a[G][CG];
    for (int g = 0; g < G; ++g)
      for (int cc = 0; cc < CG; ++cc) a[g][cc] = _mm256_loadu_ps(acc + g * D + (c0 + cc) * 8);
    for (int b = 0; b < num_blocks; ++b) {
      const T* vb = blocks[b];
      const float* sb = s + b * bs;
      const int n = b + 1 < num_blocks ? bs : last_rows;
      for (int t = 0; t < n; ++t) {
        __m256 pg[G];
        for (int g = 0; g < G; ++g) pg[g] = _mm256_broadcast_ss(sb + g * stride + t);
        for (int cc = 0; cc < CG; ++cc) {
          const __m256 v = load8(vb + t * D + (c0 + cc) * 8);
          for (int g = 0; g < G; ++g) a[g][cc] = _mm256_fmadd_ps(pg[g], v, a[g][cc]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int cc = 0; cc < CG; ++cc) _mm256_storeu_ps(acc + g * D + (c0 + cc) * 8, a[g][cc]);
  }
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

// KV heads [kvh0, kvh1) of one sequence's single query token over KV blocks
// [block_begin, block_end), in rounds of up to kRoundTokens keys: the scores
// of a round's blocks (a block's heads lie next to each other in the cache
// and are scored one after another, so an item of several heads reads whole
// blocks), then per head one softmax update and one pass over the values.
// Rounds rather than single blocks keep the dependent chain scores ->
// maximum -> weights -> values long enough for the core to overlap it.
template <typename T, int D, int G>
__attribute__((target("avx2,fma"))) void decode_item(const PagedAttentionParams& p, int seq,
                                                     int kvh0, int kvh1, int block_begin,
                                                     int block_end, DecodeScratch& w,
                                                     DecodePartial* partial) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int bs = p.block_size, heads = kvh1 - kvh0;
  const int round_blocks = kRoundTokens / bs;
  const int pos = p.seq_lens[seq] - 1;
  const int64_t tok = p.query_start_loc[seq];
  w.q.resize(static_cast<size_t>(heads) * G * D);
  w.s.resize(static_cast<size_t>(heads) * G * kRoundTokens);
  if (!partial) w.states.resize(heads);
  auto state_of = [&](int h) -> DecodePartial& { return partial ? *partial : w.states[h]; };
  const T* query = static_cast<const T*>(p.query.data);
  for (int h = 0; h < heads; ++h) {
    DecodePartial& st = state_of(h);
    for (int g = 0; g < G; ++g) {
      const T* src = query + tok * p.query.row_stride + ((kvh0 + h) * G + g) * p.query.head_stride;
      for (int d = 0; d < D; ++d)
        w.q[(h * G + g) * D + key_order<T>(d)] = to_float(src[d]) * p.scale;
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
  const T* values[kRoundTokens];
  for (int r0 = std::max(block_begin, lo / bs); r0 < b_end; r0 += round_blocks) {
    const int r1 = std::min(b_end, r0 + round_blocks);
    const int last_rows = std::min(bs, pos + 1 - (r1 - 1) * bs);
    const int n = (r1 - 1 - r0) * bs + last_rows;
    for (int b = r0; b < r1; ++b) {
      const bool has_next = b + 1 < b_end;
      for (int h = 0; h < heads; ++h) {
        const int64_t off = table[b] * block_elems + (kvh0 + h) * head_elems;
        const int64_t next = has_next ? table[b + 1] * block_elems + (kvh0 + h) * head_elems : 0;
        float* s = w.s.data() + h * G * kRoundTokens + (b - r0) * bs;
        score_block<T, D, G>(w.q.data() + h * G * D, kc + off, vc + off,
                             has_next ? reinterpret_cast<const char*>(kc + next) : nullptr,
                             b + 1 < r1 ? bs : last_rows, kRoundTokens, s);
      }
    }
    const int masked = std::max(0, lo - r0 * bs);  // rows before the sliding window
    for (int h = 0; h < heads; ++h) {
      DecodePartial& st = state_of(h);
      float* s = w.s.data() + h * G * kRoundTokens;
      for (int g = 0; g < G; ++g) {
        std::fill(s + g * kRoundTokens, s + g * kRoundTokens + masked, kNegInf);
        softmax_round<D>(s + g * kRoundTokens, n, st.m[g], st.l[g], st.acc + g * D);
      }
      for (int b = r0; b < r1; ++b)
        values[b - r0] = vc + table[b] * block_elems + (kvh0 + h) * head_elems;
      accumulate_values<T, D, G>(s, kRoundTokens, values, r1 - r0, bs, last_rows, st.acc);
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
    case 256:
      return dispatch_group<T, 256>(p, seq, kvh0, kvh1, b0, b1, w, partial);
    default:
      return false;
  }
}

}  // namespace

bool decode_fast_path_supported(const PagedAttentionParams& p) {
  const int group = p.num_heads / p.num_kv_heads;
  return cpu_has_avx2_fma() && p.softcap == 0.f && p.alibi_slopes == nullptr &&
         p.sinks == nullptr && group >= 1 && group <= 8 &&
         (p.head_size == 64 || p.head_size == 128 || p.head_size == 256) &&
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
