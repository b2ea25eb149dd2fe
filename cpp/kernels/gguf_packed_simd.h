// Integer products over packed GGUF blocks for one x86 instruction set.
// gguf_packed.cpp includes this file once per set, inside a namespace of its
// own, with TM_GGUF_TARGET (the function attribute) and kVnni defined; hence
// no include guard.
//
// A pair of rows' quants for one block sits in two 256-bit registers, one row
// per 128-bit lane: their products with the activation block broadcast to both
// lanes give four int32 partial sums per row, scaled per block in float.

// The sums of four adjacent u * s products (unsigned x signed bytes) of two
// pairs of registers, as eight int32 lanes. kNarrow: 4-bit weights, whose
// pair sums fit the int16 lanes of vpmaddubsw's result.
template <bool kNarrow>
TM_GGUF_TARGET inline __m256i dot2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  if constexpr (kVnni) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
  } else {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i p0 = _mm256_maddubs_epi16(u0, s0), p1 = _mm256_maddubs_epi16(u1, s1);
    if constexpr (kNarrow) return _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones);
    return _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
  }
}

// Rows 4g .. 4g + 3 of the weight against activation rows i0 .. i0 + M - 1.
template <GgufType T, int M>
TM_GGUF_TARGET void group_rows(const uint8_t* group, int64_t blocks, const Q8Activations& x,
                               int64_t i0, float* out, int64_t n, int64_t row0) {
  constexpr int kQuant = quant_bytes(T), kBytes = group_block_bytes(T);
  constexpr bool kQ8 = T == GgufType::kQ8_0;
  // Without VNNI, 8-bit weights take vpmaddubsw's sign trick (|w| against
  // x * sign(w)); with it they gain an offset of 128, paid back per block.
  constexpr bool kSignTrick = kQ8 && !kVnni;
  constexpr float kOffset = T == GgufType::kQ4_1 ? 1.f
                            : T == GgufType::kQ4_0 ? -8.f
                            : kSignTrick           ? 0.f
                                                   : -128.f;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
  const __m256i first_pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i second_pair = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  __m256 acc[M][2], offsets[M];
  for (int r = 0; r < M; ++r)
    acc[r][0] = acc[r][1] = offsets[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* gb = group + b * kBytes;
    __m256i w[2][2];  // [pair][weights 0-15, 16-31]
    for (int p = 0; p < 2; ++p) {
      if constexpr (kQ8) {
        w[p][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * p));
        w[p][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * p + 32));
        for (int h = 0; h < 2; ++h)
          w[p][h] = kSignTrick ? w[p][h] : _mm256_xor_si256(w[p][h], _mm256_set1_epi8(-128));
      } else {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 32 * p));
        w[p][0] = _mm256_and_si256(raw, low_nibbles);
        w[p][1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_nibbles);
      }
    }
    const uint8_t* s = gb + 4 * kQuant;
    __m256 factors;  // d0..d3, then m0..m3 (Q4_1) or d0..d3 again
    if constexpr (T == GgufType::kQ4_1) {
      factors = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
    } else {
      const __m128 d = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
      factors = _mm256_set_m128(d, d);
    }
    for (int r = 0; r < M; ++r) {
      const int8_t* xb = x.q.data() + (i0 + r) * x.k + b * kBlock;
      const __m256i x0 =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
      const __m256i x1 =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)));
      const __m256 f =
          _mm256_mul_ps(factors, _mm256_loadu_ps(x.scales.data() + ((i0 + r) * blocks + b) * 8));
      for (int p = 0; p < 2; ++p) {
        __m256i sums;
        if constexpr (kSignTrick) {
          sums = dot2<false>(_mm256_sign_epi8(w[p][0], w[p][0]), _mm256_sign_epi8(x0, w[p][0]),
                             _mm256_sign_epi8(w[p][1], w[p][1]), _mm256_sign_epi8(x1, w[p][1]));
        } else {
          sums = dot2<!kQ8>(w[p][0], x0, w[p][1], x1);
        }
        const __m256 scale = _mm256_permutevar8x32_ps(f, p ? second_pair : first_pair);
        acc[r][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r][p]);
      }
      offsets[r] = _mm256_add_ps(offsets[r], f);
    }
  }
  for (int r = 0; r < M; ++r) {
    alignas(32) float a[2][8], o[8];
    _mm256_store_ps(a[0], acc[r][0]);
    _mm256_store_ps(a[1], acc[r][1]);
    _mm256_store_ps(o, offsets[r]);
    for (int j = 0; j < kGroupRows && row0 + j < n; ++j) {
      const float* lanes = a[j / 2] + 4 * (j % 2);
      out[(i0 + r) * n + row0 + j] =
          (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + kOffset * o[4 + j];
    }
  }
}

// Weight groups [g0, g1) against every activation row: rows in tiles that
// stay in cache while the groups pass, M rows at a time against a group.
template <GgufType T>
TM_GGUF_TARGET void linear_groups(const GgufWeight& w, const Q8Activations& x, float* out,
                                  int64_t g0, int64_t g1) {
  constexpr int kMaxM = kVnni ? 4 : 2;  // accumulators within the register file
  constexpr int64_t kTile = 64;
  const int64_t blocks = w.k / kBlock;
  for (int64_t t0 = 0; t0 < x.m; t0 += kTile) {
    const int64_t t1 = t0 + kTile < x.m ? t0 + kTile : x.m;
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* group = w.data + g * w.row_bytes;
      int64_t i = t0;
      for (; i + kMaxM <= t1; i += kMaxM)
        group_rows<T, kMaxM>(group, blocks, x, i, out, w.n, g * kGroupRows);
      if (kMaxM > 2 && i + 2 <= t1) {
        group_rows<T, 2>(group, blocks, x, i, out, w.n, g * kGroupRows);
        i += 2;
      }
      for (; i < t1; ++i) group_rows<T, 1>(group, blocks, x, i, out, w.n, g * kGroupRows);
    }
  }
}

TM_GGUF_TARGET void linear(const GgufWeight& w, const Q8Activations& x, float* out, int64_t g0,
                           int64_t g1) {
  switch (w.type) {
    case GgufType::kQ4_0:
      return linear_groups<GgufType::kQ4_0>(w, x, out, g0, g1);
    case GgufType::kQ4_1:
      return linear_groups<GgufType::kQ4_1>(w, x, out, g0, g1);
    case GgufType::kQ8_0:
      return linear_groups<GgufType::kQ8_0>(w, x, out, g0, g1);
    default:
      return;
  }
}

// Activation rows [i0, i1) of x [m, k] into 8-bit blocks.
TM_GGUF_TARGET void quantize(const float* x, int64_t i0, int64_t i1, Q8Activations& out) {
  const int64_t k = out.k, blocks = k / kBlock;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + i * k + b * kBlock;
      __m256 q[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        q[j] = _mm256_loadu_ps(v + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_and_ps(q[j], abs_mask));
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_movehdup_ps(m));
      const float d = _mm_cvtss_f32(m) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      __m256i n[4], total = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(q[j], _mm256_set1_ps(inv)));
        total = _mm256_add_epi32(total, n[j]);
      }
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                               _mm256_packs_epi32(n[2], n[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + i * k + b * kBlock),
                          _mm256_permutevar8x32_epi32(bytes, order));
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
      const float ds = d * static_cast<float>(_mm_cvtsi128_si32(t));
      _mm256_storeu_ps(out.scales.data() + (i * blocks + b) * 8,
                       _mm256_setr_ps(d, d, d, d, ds, ds, ds, ds));
    }
}
