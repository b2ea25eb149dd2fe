#include "tokenmill/step_cost.h"

#include <algorithm>
#include <cmath>

namespace tokenmill {

void StepCostModel::observe(const StepShape& step, double ms) {
  if (step.prefill_tokens + step.decode_rows <= 0 || !(ms > 0) || !std::isfinite(ms)) return;
  const double x[kTerms] = {1.0, static_cast<double>(step.prefill_tokens),
                            static_cast<double>(step.decode_rows),
                            step.prefill_context + step.decode_context};
  for (int i = 0; i < kTerms; ++i) {
    xty_[i] = decay_ * xty_[i] + x[i] * ms;
    for (int j = 0; j < kTerms; ++j) xtx_[i][j] = decay_ * xtx_[i][j] + x[i] * x[j];
  }
  ++observations_;
  if (step.prefill_tokens > 0) {
    ++prefill_steps_;
    prefill_tokens_seen_ = decay_ * prefill_tokens_seen_ + step.prefill_tokens;
    prefill_context_seen_ = decay_ * prefill_context_seen_ + step.prefill_context;
  }
  solve();
}

// Solves a[n][n] x = b in place (Gauss-Jordan with partial pivoting);
// false when singular.
template <int N>
static bool solve_linear(double (&a)[N][N + 1], int n) {
  for (int c = 0; c < n; ++c) {
    int pivot = c;
    for (int r = c + 1; r < n; ++r)
      if (std::fabs(a[r][c]) > std::fabs(a[pivot][c])) pivot = r;
    if (std::fabs(a[pivot][c]) < 1e-12) return false;
    for (int k = 0; k <= n; ++k) std::swap(a[c][k], a[pivot][k]);
    for (int r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[r][c] / a[c][c];
      for (int k = c; k <= n; ++k) a[r][k] -= f * a[c][k];
    }
  }
  return true;
}

// Weighted least squares with non-negative costs: every subset of the terms
// that holds the fixed part is fitted (with a tiny ridge for terms no step has varied yet), and the
// fit with the least residual whose costs are all non-negative wins, the
// one with fewer terms on a tie (steps of few shapes fit many ways; the
// simplest is the one to extrapolate from).
void StepCostModel::solve() {
  constexpr int n = kTerms;
  double best = INFINITY;
  std::array<double, kTerms> found{};
  for (int count = 1; count <= n; ++count) {
    for (int mask = 1; mask < (1 << n); mask += 2) {  // the fixed part is always a term
      if (__builtin_popcount(mask) != count) continue;
      int idx[n], m = 0;
      for (int i = 0; i < n; ++i)
        if (mask >> i & 1) idx[m++] = i;
      double sq[n][n + 1];  // the solver works on its leading m x (m + 1) entries
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < m; ++j) sq[i][j] = xtx_[idx[i]][idx[j]];
        sq[i][i] = sq[i][i] * (1 + 1e-9) + 1e-9;
        sq[i][m] = xty_[idx[i]];
      }
      if (!solve_linear<n>(sq, m)) continue;
      std::array<double, kTerms> c{};
      bool feasible = true;
      for (int i = 0; i < m; ++i) {
        c[idx[i]] = sq[i][m] / sq[i][i];
        feasible &= c[idx[i]] >= 0;
      }
      if (!feasible) continue;
      // residual = yty - 2 c.xty + c' xtx c (yty is the same for all fits)
      double r = 0;
      for (int i = 0; i < n; ++i) {
        r -= 2 * c[i] * xty_[i];
        for (int j = 0; j < n; ++j) r += c[i] * xtx_[i][j] * c[j];
      }
      if (best == INFINITY || r < best - 1e-6 * std::fabs(best)) {
        best = r;
        found = c;
      }
    }
  }
  if (best < INFINITY) coef_ = found;
}

double StepCostModel::predict(const StepShape& step) const {
  return coef_[0] + coef_[1] * step.prefill_tokens + coef_[2] * step.decode_rows +
         coef_[3] * (step.prefill_context + step.decode_context);
}

int StepCostModel::tokens_within(double ms, int decode_rows, double decode_context) const {
  const double context_per_token =
      prefill_tokens_seen_ > 0 ? prefill_context_seen_ / prefill_tokens_seen_ : 0;
  const double per_token = coef_[1] + coef_[3] * context_per_token;
  if (per_token <= 0) return 0;
  const double left = ms - predict(StepShape{0, decode_rows, 0, decode_context});
  return left <= 0 ? 0 : static_cast<int>(left / per_token);
}

}  // namespace tokenmill
