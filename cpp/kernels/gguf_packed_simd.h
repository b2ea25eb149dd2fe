// Integer products over packed GGUF blocks for one x86 instruction set.
// gguf_packed.cpp includes this file once per set, inside a namespace of its
// own, with TM_GGUF_TARGET (the function attribute) and kVnni defined; hence
// no include guard.
//
// Each 32-bit lane of a quant chunk holds four weights of one of a group's
// eight rows, so multiply-adds against four activation bytes broadcast to
// every lane sum a whole block into one int32 lane per row: a block costs
// one conversion and one scaling for eight rows.

TM_GGUF_TARGET inline int32_t hsum_epi32(__m256i v) {
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  return _mm_cvtsi128_si32(t);
}

// x's four bytes at p in every 32-bit lane.
TM_GGUF_TARGET inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The sum over a block's weights of q times the activations' q, per row:
// offsets (kOffset) turn it into the product with the weights' values.
// d_w d_x sum(q_w q_x) + kOffset * f_w * d_x sum(q_x) per block, where f is
// the second factor (Q4_1's minimum, the K types' minimum) or d itself; Q6_K's
// two halves each meet their own scale and activation sum.
template <GgufType T>
constexpr float offset_factor() {
  switch (T) {
    case GgufType::kQ4_1:
      return 1.f;
    case GgufType::kQ4_K:
    case GgufType::kQ5_K:
      return -1.f;
    case GgufType::kQ4_0:
      return -8.f;
    case GgufType::kQ5_0:
      return -16.f;
    case GgufType::kQ6_K:
      return -32.f;
    default:  // Q8_0: signed weights, or with VNNI weights shifted by 128
      return kVnni ? -128.f : 0.f;
  }
}

// One block of a group's rows against 32 activation bytes xb: int32 sums of
// q_w q_x per row in two chains (Q6_K: one per half, else alternate chunks).
template <GgufType T>
TM_GGUF_TARGET inline void block_sums(const __m256i* w, const int8_t* xb, __m256i sums[2]) {
  constexpr bool kHalves = T == GgufType::kQ6_K;
  constexpr bool kSignTrick = T == GgufType::kQ8_0 && !kVnni;
  const __m256i ones = _mm256_set1_epi16(1);
  sums[0] = sums[1] = _mm256_setzero_si256();
  if constexpr (kVnni) {
    for (int c = 0; c < 8; ++c) {
      const int chain = kHalves ? c / 4 : c % 2;
      sums[chain] = _mm256_dpbusd_epi32(sums[chain], w[c], broadcast4(xb + 4 * c));
    }
  } else if constexpr (byte_quants(T)) {  // one pair sum per chunk: |w| x 128 x 2 fits int16
    for (int c = 0; c < 8; ++c) {
      const __m256i xc = broadcast4(xb + 4 * c);
      const __m256i pairs = kSignTrick ? _mm256_maddubs_epi16(_mm256_sign_epi8(w[c], w[c]),
                                                              _mm256_sign_epi8(xc, w[c]))
                                       : _mm256_maddubs_epi16(w[c], xc);
      const int chain = kHalves ? c / 4 : c % 2;
      sums[chain] = _mm256_add_epi32(sums[chain], _mm256_madd_epi16(pairs, ones));
    }
  } else {  // 4- and 5-bit weights: four pair sums fit int16 (4 x 2 x 31 x 128)
    __m256i pairs[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int c = 0; c < 8; ++c)
      pairs[c % 2] =
          _mm256_add_epi16(pairs[c % 2], _mm256_maddubs_epi16(w[c], broadcast4(xb + 4 * c)));
    sums[0] = _mm256_madd_epi16(pairs[0], ones);
    sums[1] = _mm256_madd_epi16(pairs[1], ones);
  }
}

// Rows 8g .. 8g + 7 of the weight against activation rows i0 .. i0 + M - 1.
template <GgufType T, bool kWide, int M, typename Out>
TM_GGUF_TARGET void group_rows(const uint8_t* group, int64_t blocks, const Q8Activations& x,
                               int64_t i0, Out* out, int64_t out_stride, int64_t n, int64_t row0) {
  constexpr int kChunks = quant_chunks(T), kBytes = group_block_bytes(T);
  // Without VNNI, 8-bit weights take vpmaddubsw's sign trick (|w| against
  // x * sign(w)); with it they gain an offset of 128, paid back per block.
  constexpr bool kQ8 = T == GgufType::kQ8_0, kHalves = T == GgufType::kQ6_K;
  constexpr float kOffset = offset_factor<T>();
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
  __m256 acc[M], offsets[M];
  for (int r = 0; r < M; ++r) acc[r] = offsets[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* gb = group + b * kBytes;
    // w[c]: weights 4c .. 4c + 3 of each row (Q4, Q5: chunk c's low nibbles
    // for c < 4, chunk c - 4's high nibbles, weights 16 + 4(c - 4) .., above).
    __m256i w[8];
    for (int c = 0; c < kChunks; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 32 * c));
      if constexpr (byte_quants(T)) {
        w[c] = kQ8 && kVnni ? _mm256_xor_si256(raw, _mm256_set1_epi8(-128)) : raw;
      } else {
        w[c] = _mm256_and_si256(raw, low_nibbles);
        w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_nibbles);
      }
    }
    if constexpr (fifth_bits(T)) {  // bit c of the plane to bit 4 of nibble c
      const __m256i plane = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 128));
      const __m256i bit4 = _mm256_set1_epi8(0x10);
      for (int c = 0; c < 8; ++c) {
        const __m256i moved =
            c < 4 ? _mm256_slli_epi16(plane, 4 - c) : _mm256_srli_epi16(plane, c - 4);
        w[c] = _mm256_or_si256(w[c], _mm256_and_si256(moved, bit4));
      }
    }
    const uint8_t* s = gb + scale_offset(T);
    __m256 d, f;
    if constexpr (k_type(T)) {
      d = _mm256_loadu_ps(reinterpret_cast<const float*>(s));
      f = _mm256_loadu_ps(reinterpret_cast<const float*>(s + 32));
    } else {
      d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
      f = T == GgufType::kQ4_1
              ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16)))
              : d;
    }
    for (int r = 0; r < M; ++r) {
      const int8_t* xb = x.q.data() + (i0 + r) * x.k + b * kBlock;
      __m256i sums[2];
      block_sums<T>(w, xb, sums);
      if constexpr (kWide) {  // 14-bit activations: 128 x high bytes + low ones
        __m256i high[2];
        block_sums<T>(w, x.high.data() + (i0 + r) * x.k + b * kBlock, high);
        for (int h = 0; h < 2; ++h)
          sums[h] = _mm256_add_epi32(sums[h], _mm256_slli_epi32(high[h], 7));
      }
      const float* xs = x.scales.data() + ((i0 + r) * blocks + b) * kActivationFactors;
      const __m256 dx = _mm256_set1_ps(xs[0]);
      if constexpr (kHalves) {
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[0]), _mm256_mul_ps(d, dx), acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[1]), _mm256_mul_ps(f, dx), acc[r]);
        offsets[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(xs[2]), offsets[r]);
        offsets[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(xs[3]), offsets[r]);
      } else {
        const __m256 total = _mm256_cvtepi32_ps(_mm256_add_epi32(sums[0], sums[1]));
        acc[r] = _mm256_fmadd_ps(total, _mm256_mul_ps(d, dx), acc[r]);
        offsets[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(xs[1]), offsets[r]);
      }
    }
  }
  for (int r = 0; r < M; ++r) {
    const __m256 rows = _mm256_fmadd_ps(offsets[r], _mm256_set1_ps(kOffset), acc[r]);
    Out* o = out + (i0 + r) * out_stride + row0;
    if (row0 + kGroupRows <= n) {
      store8(o, rows);
    } else {
      alignas(32) float v[8];
      _mm256_store_ps(v, rows);
      for (int j = 0; row0 + j < n; ++j) o[j] = from_float<Out>(v[j]);
    }
  }
}

// Weight groups [g0, g1) against every activation row: groups in chunks
// that stay in cache while every tile of activation rows passes them, M
// rows at a time against a group.
template <GgufType T, bool kWide, typename Out>
TM_GGUF_TARGET void linear_groups(const GgufWeight& w, const Q8Activations& x, Out* out,
                                  int64_t out_stride, int64_t g0, int64_t g1) {
  constexpr int kMaxM = kVnni ? 4 : 2;  // accumulators within the register file
  constexpr int64_t kTile = 64, kChunkBytes = 256 << 10;
  const int64_t blocks = w.k / kBlock;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / w.row_bytes);
  for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
    const int64_t c1 = std::min(g1, c0 + chunk);
    for (int64_t t0 = 0; t0 < x.m; t0 += kTile) {
      const int64_t t1 = std::min(x.m, t0 + kTile);
      for (int64_t g = c0; g < c1; ++g) {
        const uint8_t* group = w.data + g * w.row_bytes;
        const int64_t row0 = g * kGroupRows;
        int64_t i = t0;
        for (; i + kMaxM <= t1; i += kMaxM)
          group_rows<T, kWide, kMaxM>(group, blocks, x, i, out, out_stride, w.n, row0);
        if (kMaxM > 2 && i + 2 <= t1) {
          group_rows<T, kWide, 2>(group, blocks, x, i, out, out_stride, w.n, row0);
          i += 2;
        }
        for (; i < t1; ++i)
          group_rows<T, kWide, 1>(group, blocks, x, i, out, out_stride, w.n, row0);
      }
    }
  }
}

template <bool kWide, typename Out>
TM_GGUF_TARGET void linear_types(const GgufWeight& w, const Q8Activations& x, Out* out,
                                 int64_t out_stride, int64_t g0, int64_t g1) {
  switch (w.type) {
    case GgufType::kQ4_0:
      return linear_groups<GgufType::kQ4_0, kWide>(w, x, out, out_stride, g0, g1);
    case GgufType::kQ4_1:
      return linear_groups<GgufType::kQ4_1, kWide>(w, x, out, out_stride, g0, g1);
    case GgufType::kQ5_0:
      return linear_groups<GgufType::kQ5_0, kWide>(w, x, out, out_stride, g0, g1);
    case GgufType::kQ8_0:
      return linear_groups<GgufType::kQ8_0, kWide>(w, x, out, out_stride, g0, g1);
    case GgufType::kQ4_K:
      return linear_groups<GgufType::kQ4_K, kWide>(w, x, out, out_stride, g0, g1);
    case GgufType::kQ5_K:
      return linear_groups<GgufType::kQ5_K, kWide>(w, x, out, out_stride, g0, g1);
    case GgufType::kQ6_K:
      return linear_groups<GgufType::kQ6_K, kWide>(w, x, out, out_stride, g0, g1);
    default:
      return;
  }
}

template <typename Out>
TM_GGUF_TARGET void linear(const GgufWeight& w, const Q8Activations& x, Out* out,
                           int64_t out_stride, int64_t g0, int64_t g1) {
  x.wide ? linear_types<true>(w, x, out, out_stride, g0, g1)
         : linear_types<false>(w, x, out, out_stride, g0, g1);
}

// Four vectors of eight int32 values in [-128, 128) as 32 bytes, in order.
TM_GGUF_TARGET inline void store_bytes(int8_t* dst, const __m256i* v) {
  const __m256i bytes =
      _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  _mm256_storeu_si256(
      reinterpret_cast<__m256i*>(dst),
      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// Activation rows [i0, i1) of x [m, k] (row stride x_stride) into 8-bit blocks.
template <typename In>
TM_GGUF_TARGET void quantize(const In* x, int64_t x_stride, int64_t i0, int64_t i1,
                             Q8Activations& out) {
  const int64_t k = out.k, blocks = k / kBlock;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      const In* v = x + i * x_stride + b * kBlock;
      __m256 q[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        q[j] = load8(v + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_and_ps(q[j], abs_mask));
      }
      __m128 mx = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
      mx = _mm_max_ss(mx, _mm_movehdup_ps(mx));
      const float d = _mm_cvtss_f32(mx) / (out.wide ? 8191.f : 127.f);
      const float inv = d > 0.f ? 1.f / d : 0.f;
      __m256i n[4];
      for (int j = 0; j < 4; ++j)
        n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(q[j], _mm256_set1_ps(inv)));
      if (out.wide) {  // q = 128 high + low, low in [0, 128)
        __m256i low[4], high[4];
        for (int j = 0; j < 4; ++j) {
          high[j] = _mm256_srai_epi32(n[j], 7);
          low[j] = _mm256_and_si256(n[j], _mm256_set1_epi32(127));
        }
        store_bytes(out.q.data() + i * k + b * kBlock, low);
        store_bytes(out.high.data() + i * k + b * kBlock, high);
      } else {
        store_bytes(out.q.data() + i * k + b * kBlock, n);
      }
      const float lo = static_cast<float>(hsum_epi32(_mm256_add_epi32(n[0], n[1])));
      const float hi = static_cast<float>(hsum_epi32(_mm256_add_epi32(n[2], n[3])));
      float* scales = out.scales.data() + (i * blocks + b) * kActivationFactors;
      scales[0] = d;
      scales[1] = d * (lo + hi);
      scales[2] = d * lo;
      scales[3] = d * hi;
    }
}
