// Mixture-of-experts MLP (kernel_params.h's MoeParams) in two launches. A
// warp computes one output of one (token, slot) row, its lanes striding over
// the input so that weight reads coalesce: first h = act(gate) * up of every
// row into a float32 workspace, then each token's weighted sum over its
// slots of the down projection. Only the routed experts' weights are read.
#include "common.cuh"
#include "kernels.h"

namespace tokenmill::gpu {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;

__device__ __forceinline__ float gated(const MoeParams& p, float gate, float up) {
  if (p.swiglu_limit > 0.f) {
    gate = fminf(gate, p.swiglu_limit);
    up = fmaxf(-p.swiglu_limit, fminf(up, p.swiglu_limit));
    return (up + 1.f) * gate / (1.f + __expf(-p.swiglu_alpha * gate));
  }
  if (p.act == Activation::kSilu) return gate / (1.f + __expf(-gate)) * up;
  const float u = 0.7978845608028654f * (gate + 0.044715f * gate * gate * gate);
  return 0.5f * gate * (1.f + tanhf(u)) * up;
}

template <typename TX, typename TW>
__global__ void moe_gate_up_kernel(MoeParams p, float* __restrict__ h) {
  const int64_t row = blockIdx.x;  // token * top_k + slot
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= p.inter) return;
  const int e = p.topk_ids[row];
  const TX* x = static_cast<const TX*>(p.x) + (row / p.top_k) * p.x_stride;
  const TW* wg =
      static_cast<const TW*>(p.w13) + (static_cast<int64_t>(e) * 2 * p.inter + i) * p.hidden;
  const TW* wu = wg + p.inter * p.hidden;
  float gate = 0.f, up = 0.f;
  for (int64_t k = lane; k < p.hidden; k += kWarpSize) {
    const float xv = to_float(x[k]);
    gate += xv * to_float(wg[k]);
    up += xv * to_float(wu[k]);
  }
  gate = warp_sum(gate);
  up = warp_sum(up);
  if (lane == 0) {
    if (p.b13 != nullptr) {
      gate += p.b13[e * 2 * p.inter + i];
      up += p.b13[e * 2 * p.inter + p.inter + i];
    }
    h[row * p.inter + i] = gated(p, gate, up);
  }
}

template <typename TX, typename TW>
__global__ void moe_down_kernel(MoeParams p, const float* __restrict__ h) {
  const int64_t t = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (o >= p.hidden) return;
  float total = 0.f;
  for (int64_t j = 0; j < p.top_k; ++j) {
    const int64_t row = t * p.top_k + j;
    const int e = p.topk_ids[row];
    const TW* w = static_cast<const TW*>(p.w2) + (static_cast<int64_t>(e) * p.hidden + o) * p.inter;
    const float* hr = h + row * p.inter;
    float acc = 0.f;
    for (int64_t k = lane; k < p.inter; k += kWarpSize) acc += hr[k] * to_float(w[k]);
    acc = warp_sum(acc);
    if (p.b2 != nullptr) acc += p.b2[e * p.hidden + o];
    total += p.topk_weights[row] * acc;
  }
  if (lane == 0) static_cast<TX*>(p.out)[t * p.out_stride + o] = from_float<TX>(total);
}

template <class F>
const char* dispatch_pair(DType x, DType w, F&& f) {
  const char* err = nullptr;
  const char* inner =
      dispatch_dtype(x, [&](auto xt) { err = dispatch_dtype(w, [&](auto wt) { f(xt, wt); }); });
  return inner ? inner : err;
}

}  // namespace

int64_t fused_moe_workspace_floats(const MoeParams& p) { return p.num_tokens * p.top_k * p.inter; }

const char* fused_moe(const MoeParams& p, float* workspace, void* stream) {
  if (p.num_tokens == 0) return nullptr;
  const dim3 grid1(static_cast<unsigned>(p.num_tokens * p.top_k),
                   static_cast<unsigned>((p.inter + kWarps - 1) / kWarps));
  const dim3 grid2(static_cast<unsigned>(p.num_tokens),
                   static_cast<unsigned>((p.hidden + kWarps - 1) / kWarps));
  const char* err = dispatch_pair(p.x_dtype, p.w_dtype, [&](auto xt, auto wt) {
    using TX = decltype(xt);
    using TW = decltype(wt);
    TM_LAUNCH(grid1, kThreads, stream, moe_gate_up_kernel<TX, TW>)(p, workspace);
    TM_LAUNCH(grid2, kThreads, stream, moe_down_kernel<TX, TW>)(p, workspace);
  });
  return err ? err : last_error();
}

}  // namespace tokenmill::gpu
