// Mixture-of-experts MLP on the CPU. Token rows are sorted by expert (a
// counting sort of the routing table), gathered, and each routed expert runs
// its gate/up and down projections once over all of its rows through the
// dense kernel (linear.cpp), which streams the weight once per call: a decode
// step reads exactly the experts that its tokens chose. The weighted sum of
// each token's expert outputs is taken in float32.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "tokenmill/kernels.h"

namespace tokenmill::cpu {
namespace {

float activate(Activation a, float x) {
  switch (a) {
    case Activation::kSilu:
      return x / (1.f + std::exp(-x));
    case Activation::kGeluExact:
      return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    default:
      return 0.5f * x * (1.f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  }
}

// h[r, :inter] = act(gate_up[r, :inter]) * gate_up[r, inter:] for `rows` rows.
void gate_rows(const MoeParams& p, float* h, const float* gate_up, int64_t rows) {
  const int64_t d = p.inter;
#pragma omp parallel for schedule(static) if (rows * d > 4096)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * d;
    float* o = h + r * d;
    for (int64_t i = 0; i < d; ++i) {
      if (p.swiglu_limit > 0.f) {
        const float gate = std::min(g[i], p.swiglu_limit);
        const float up = std::max(-p.swiglu_limit, std::min(g[d + i], p.swiglu_limit));
        o[i] = (up + 1.f) * gate / (1.f + std::exp(-p.swiglu_alpha * gate));
      } else {
        o[i] = activate(p.act, g[i]) * g[d + i];
      }
    }
  }
}

void add_bias(float* rows, const float* bias, int64_t m, int64_t n) {
  if (bias == nullptr) return;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j) rows[r * n + j] += bias[j];
}

// Rows [row0, row0 + n) of a coded weight, as a weight of their own.
CodedBf16 coded_rows(const CodedBf16& w, int64_t row0, int64_t n) {
  return {w.low + row0 * w.k,
          w.codes + row0 * (w.k / 2),
          w.table,
          w.escape_offsets + row0,
          w.escape_cols,
          w.escape_values,
          n,
          w.k};
}

}  // namespace

void fused_moe(const MoeParams& p, const CodedBf16* w13_coded, const CodedBf16* w2_coded) {
  if (p.w_dtype == DType::kFloat16)
    throw std::invalid_argument("fused_moe takes float32 or bfloat16 weights");
  const int64_t rows = p.num_tokens * p.top_k, H = p.hidden, I = p.inter, E = p.num_experts;
  // Counting sort of the (token, slot) rows by expert.
  std::vector<int64_t> start(E + 1, 0), order(rows), slot_of(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t e = p.topk_ids[r];
    if (e < 0 || e >= E) throw std::out_of_range("fused_moe: expert id out of range");
    ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = next[p.topk_ids[r]]++;
    order[pos] = r;
    slot_of[r] = pos;
  }
  std::vector<float> xs(static_cast<size_t>(rows * H)), gate_up(static_cast<size_t>(rows * 2 * I)),
      h(static_cast<size_t>(rows * I)), y(static_cast<size_t>(rows * H));
  const size_t elt = p.w_dtype == DType::kFloat32 ? 4 : 2;
  const auto* x = static_cast<const char*>(p.x);
  const size_t x_elt = p.x_dtype == DType::kFloat32 ? 4 : 2;
  for (int64_t pos = 0; pos < rows; ++pos) {
    const int64_t t = order[pos] / p.top_k;
    rows_to_float(p.x_dtype, &xs[pos * H], x + t * p.x_stride * x_elt, 1, H, p.x_stride, H);
  }
  const auto* w13 = static_cast<const char*>(p.w13);
  const auto* w2 = static_cast<const char*>(p.w2);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = start[e], m = start[e + 1] - r0;
    if (m == 0) continue;
    float* gu = &gate_up[r0 * 2 * I];
    if (w13_coded)
      coded_linear(DType::kFloat32, gu, &xs[r0 * H], coded_rows(*w13_coded, e * 2 * I, 2 * I),
                   nullptr, m, H, 2 * I);
    else
      linear(DType::kFloat32, p.w_dtype, gu, &xs[r0 * H], w13 + e * 2 * I * H * elt, nullptr, m, H,
             2 * I, H, 2 * I);
    add_bias(gu, p.b13 ? p.b13 + e * 2 * I : nullptr, m, 2 * I);
    gate_rows(p, &h[r0 * I], gu, m);
    if (w2_coded)
      coded_linear(DType::kFloat32, &y[r0 * H], &h[r0 * I], coded_rows(*w2_coded, e * H, H),
                   nullptr, m, I, H);
    else
      linear(DType::kFloat32, p.w_dtype, &y[r0 * H], &h[r0 * I], w2 + e * H * I * elt, nullptr, m,
             I, H, I, H);
    add_bias(&y[r0 * H], p.b2 ? p.b2 + e * H : nullptr, m, H);
  }
  std::vector<float> sum(static_cast<size_t>(H));
  auto* out = static_cast<char*>(p.out);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    std::fill(sum.begin(), sum.end(), 0.f);
    for (int64_t j = 0; j < p.top_k; ++j) {
      const float w = p.topk_weights[t * p.top_k + j];
      const float* src = &y[slot_of[t * p.top_k + j] * H];
      for (int64_t i = 0; i < H; ++i) sum[i] += w * src[i];
    }
    rows_from_float(p.x_dtype, out + t * p.out_stride * x_elt, sum.data(), 1, H, p.out_stride, H);
  }
}

}  // namespace tokenmill::cpu
