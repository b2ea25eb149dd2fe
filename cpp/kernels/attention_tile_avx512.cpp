// Prefill tiles of bfloat16 paged attention with AVX-512 bfloat16 dot
// products (vdpbf16ps: sixteen lanes, each the sum of two bf16 products).
// Query rows run across the lanes: the query is laid out once per tile as
// pairs of head dims by row, and each key's pair of dims is broadcast, so
// keys are read straight from the cache, the softmax of sixteen rows is one
// vector operation per key, and no scores are summed horizontally. Softmax
// weights are rounded to bfloat16 (their sum uses the rounded values) and
// multiply value rows interleaved by pairs of keys.
#include <algorithm>
#include <cstring>
#include <limits>

#include "attention_tile.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx512.h"

namespace tokenmill::cpu {
namespace {

constexpr int kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
typedef uint32_t word_alias __attribute__((may_alias));

#define TM_AVX512_FN __attribute__((target(TM_AVX512_TARGET)))

// s[t][lane] = scale * q[lane] . k[t] for eight keys and NR groups of sixteen
// rows from group g0; qp holds the query as qp[d2 * lanes + row].
template <int NR>
TM_AVX512_FN void score_keys8(const uint32_t* qp, int lanes, int g0, int d2s, const word_alias* k,
                              float scale, float* s) {
  __m512 acc[8][NR];
  for (int t = 0; t < 8; ++t)
    for (int j = 0; j < NR; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int d2 = 0; d2 < d2s; ++d2) {
    __m512i q[NR];
    for (int j = 0; j < NR; ++j) q[j] = _mm512_loadu_si512(qp + d2 * lanes + (g0 + j) * kLanes);
    for (int t = 0; t < 8; ++t) {
      const __m512i kv = _mm512_set1_epi32(static_cast<int>(k[t * d2s + d2]));
      for (int j = 0; j < NR; ++j) acc[t][j] = dot_pairs(acc[t][j], q[j], kv);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int t = 0; t < 8; ++t)
    for (int j = 0; j < NR; ++j)
      _mm512_storeu_ps(s + t * lanes + (g0 + j) * kLanes, _mm512_mul_ps(acc[t][j], sc));
}

// acc[r][c] += sum over key pairs of the rows' weights times the value pairs,
// for NR rows from r0 and NC blocks of sixteen head dims from c0.
template <int NR, int NC>
TM_AVX512_FN void weigh_values(const uint32_t* pp, int lanes, int r0, const uint32_t* vp, int D,
                               int n2, int c0, float* acc) {
  __m512 a[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) a[r][c] = _mm512_loadu_ps(acc + (r0 + r) * D + (c0 + c) * kLanes);
  for (int t2 = 0; t2 < n2; ++t2) {
    __m512i v[NC];
    for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_si512(vp + t2 * D + (c0 + c) * kLanes);
    for (int r = 0; r < NR; ++r) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(pp[t2 * lanes + r0 + r]));
      for (int c = 0; c < NC; ++c) a[r][c] = dot_pairs(a[r][c], v[c], w);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + (r0 + r) * D + (c0 + c) * kLanes, a[r][c]);
}

template <int NC>
TM_AVX512_FN void weigh_rows(const uint32_t* pp, int lanes, int rows, const uint32_t* vp, int D,
                             int n2, int c0, float* acc) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) weigh_values<4, NC>(pp, lanes, r, vp, D, n2, c0, acc);
  switch (rows - r) {
    case 3:
      weigh_values<3, NC>(pp, lanes, r, vp, D, n2, c0, acc);
      break;
    case 2:
      weigh_values<2, NC>(pp, lanes, r, vp, D, n2, c0, acc);
      break;
    case 1:
      weigh_values<1, NC>(pp, lanes, r, vp, D, n2, c0, acc);
      break;
    default:
      break;
  }
}

// Masks the scores of one block, updates each row's running max and sum, and
// leaves the rounded weights as key pairs in pp and each row's rescale
// factor in corr.
TM_AVX512_FN void block_softmax(const PagedAttentionParams& p, int t0, int n, int groups,
                                Bf16TileScratch& w) {
  const int lanes = groups * kLanes, n2 = (n + 1) / 2;
  for (int g = 0; g < groups; ++g) {
    const __m512i pos = _mm512_loadu_si512(w.pos.data() + g * kLanes);
    float* s = w.s.data() + g * kLanes;
    __m512 block_max = _mm512_set1_ps(kNegInf);
    for (int t = 0; t < 2 * n2; ++t) {
      __m512 v = _mm512_set1_ps(kNegInf);
      if (t < n) {
        const __m512i kpos = _mm512_set1_epi32(t0 + t);
        __mmask16 masked = _mm512_cmpgt_epi32_mask(kpos, pos);
        if (p.sliding_window > 0)
          masked |= _mm512_cmpge_epi32_mask(_mm512_sub_epi32(pos, kpos),
                                            _mm512_set1_epi32(p.sliding_window));
        v = _mm512_mask_mov_ps(_mm512_loadu_ps(s + t * lanes), masked, v);
      }
      _mm512_storeu_ps(s + t * lanes, v);
      block_max = _mm512_max_ps(block_max, v);
    }
    const __m512 m_old = _mm512_loadu_ps(w.m.data() + g * kLanes);
    const __m512 m = _mm512_max_ps(m_old, block_max);
    const __m512 corr = exp16(_mm512_sub_ps(m_old, m));  // 0 while a row has seen no key
    __m512 l = _mm512_mul_ps(_mm512_loadu_ps(w.l.data() + g * kLanes), corr);
    for (int t2 = 0; t2 < n2; ++t2) {
      const __m256i p0 = to_bf16x16(exp16(_mm512_sub_ps(_mm512_loadu_ps(s + 2 * t2 * lanes), m)));
      const __m256i p1 =
          to_bf16x16(exp16(_mm512_sub_ps(_mm512_loadu_ps(s + (2 * t2 + 1) * lanes), m)));
      const __m512i pair = pair16(p0, p1);
      _mm512_storeu_si512(w.pp.data() + t2 * lanes + g * kLanes, pair);
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(~0xffff)));
      l = _mm512_add_ps(l, _mm512_add_ps(lo, hi));
    }
    _mm512_storeu_ps(w.m.data() + g * kLanes, m);
    _mm512_storeu_ps(w.l.data() + g * kLanes, l);
    _mm512_storeu_ps(w.corr.data() + g * kLanes, corr);
  }
}

// Value rows of one block as key pairs: vp[t2 * D + d] = (v[2 t2][d], v[2 t2 + 1][d]),
// with zeros past the block's n keys.
TM_AVX512_FN void pair_values(const bf16* v, int n, int D, uint32_t* vp) {
  for (int t2 = 0; t2 < (n + 1) / 2; ++t2) {
    const bf16* a = v + 2 * t2 * D;
    const bf16* b = v + (2 * t2 + 1) * D;
    const bool has_b = 2 * t2 + 1 < n;
    for (int d = 0; d < D; d += kLanes) {
      const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d));
      const __m256i vb = has_b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + d))
                               : _mm256_setzero_si256();
      _mm512_storeu_si512(vp + t2 * D + d, pair16(va, vb));
    }
  }
}

TM_AVX512_FN void rescale_rows(int rows, int D, const float* corr, float* acc) {
  for (int r = 0; r < rows; ++r) {
    if (corr[r] == 1.f) continue;
    const __m512 c = _mm512_set1_ps(corr[r]);
    for (int d = 0; d < D; d += kLanes)
      _mm512_storeu_ps(acc + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d), c));
  }
}

TM_AVX512_FN void score_block(const Bf16TileScratch& w, int lanes, int groups, int d2s,
                              const word_alias* k, int n, float scale, float* s) {
  for (int t = 0; t < n; t += 8)
    for (int g = 0; g < groups; g += 3) {
      const word_alias* kt = k + t * d2s;
      float* st = s + t * lanes;
      switch (std::min(3, groups - g)) {
        case 3:
          score_keys8<3>(w.qp.data(), lanes, g, d2s, kt, scale, st);
          break;
        case 2:
          score_keys8<2>(w.qp.data(), lanes, g, d2s, kt, scale, st);
          break;
        default:
          score_keys8<1>(w.qp.data(), lanes, g, d2s, kt, scale, st);
          break;
      }
    }
}

}  // namespace

bool prefill_tile_bf16_supported(const PagedAttentionParams& p) {
  return cpu_has_avx512_bf16() && p.dtype == DType::kBFloat16 && p.head_size % 32 == 0 &&
         p.block_size % 8 == 0 && p.softcap == 0.f && p.alibi_slopes == nullptr &&
         p.sinks == nullptr;
}

TM_AVX512_FN void prefill_tile_bf16(const PagedAttentionParams& p, int seq, int kvh, int q_begin,
                                    int q_end, Bf16TileScratch& w) {
  const int D = p.head_size, d2s = D / 2, bs = p.block_size;
  const int group = p.num_heads / p.num_kv_heads;
  const int q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
  const int first_pos = p.seq_lens[seq] - q_len;
  const int rows = (q_end - q_begin) * group;
  const int groups = (rows + kLanes - 1) / kLanes, lanes = groups * kLanes;
  w.qp.assign(static_cast<size_t>(d2s) * lanes, 0u);
  w.pos.assign(lanes, first_pos + q_begin);  // padding rows: zero queries, any position
  const bf16* query = static_cast<const bf16*>(p.query.data);
  for (int r = 0; r < rows; ++r) {
    const int qi = q_begin + r / group, h = kvh * group + r % group;
    const int64_t tok = p.query_start_loc[seq] + qi;
    const auto* src = reinterpret_cast<const word_alias*>(query + tok * p.query.row_stride +
                                                          h * p.query.head_stride);
    for (int d2 = 0; d2 < d2s; ++d2) w.qp[d2 * lanes + r] = src[d2];
    w.pos[r] = first_pos + qi;
  }
  w.m.assign(lanes, kNegInf);
  w.l.assign(lanes, 0.f);
  w.corr.resize(lanes);
  w.acc.assign(static_cast<size_t>(rows) * D, 0.f);
  w.s.resize(static_cast<size_t>(bs) * lanes);
  w.pp.resize(static_cast<size_t>(bs / 2) * lanes);
  w.vp.resize(static_cast<size_t>(bs / 2) * D);

  const bf16* kc = static_cast<const bf16*>(p.key_cache);
  const bf16* vc = static_cast<const bf16*>(p.value_cache);
  const TileBlocks blocks = tile_blocks(p, seq, kvh, q_begin, q_end);
  for (int b = blocks.first; b < blocks.end; ++b) {
    const int64_t base = blocks.offset(b);
    const int t0 = b * bs, n = blocks.rows(b);
    // Keys past n within the block are scored too (a whole group of eight)
    // and then masked.
    score_block(w, lanes, groups, d2s, reinterpret_cast<const word_alias*>(kc + base), n, p.scale,
                w.s.data());
    block_softmax(p, t0, n, groups, w);
    rescale_rows(rows, D, w.corr.data(), w.acc.data());
    pair_values(vc + base, n, D, w.vp.data());
    const int n2 = (n + 1) / 2;
    int c = 0;
    for (; c + 4 <= D / kLanes; c += 4)
      weigh_rows<4>(w.pp.data(), lanes, rows, w.vp.data(), D, n2, c, w.acc.data());
    if (c < D / kLanes)
      weigh_rows<2>(w.pp.data(), lanes, rows, w.vp.data(), D, n2, c, w.acc.data());
  }

  bf16* out = static_cast<bf16*>(p.out.data);
  for (int r = 0; r < rows; ++r) {
    const int64_t tok = p.query_start_loc[seq] + q_begin + r / group;
    const int h = kvh * group + r % group;
    const __m512 inv = _mm512_set1_ps(w.l[r] > 0.f ? 1.f / w.l[r] : 0.f);
    bf16* dst = out + tok * p.out.row_stride + h * p.out.head_stride;
    for (int d = 0; d < D; d += kLanes) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(w.acc.data() + r * D + d), inv);
      store16(dst + d, v);
    }
  }
}

}  // namespace tokenmill::cpu

#else
namespace tokenmill::cpu {
bool prefill_tile_bf16_supported(const PagedAttentionParams&) { return false; }
void prefill_tile_bf16(const PagedAttentionParams&, int, int, int, int, Bf16TileScratch&) {}
}  // namespace tokenmill::cpu
#endif
