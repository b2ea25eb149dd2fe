#include "tokenmill/step_cost.h"

#include <algorithm>
#include <cmath>

namespace tokenmill {

void StepCostModel::observe(int prefill_tokens, int decode_rows, double ms) {
  if (prefill_tokens + decode_rows <= 0 || !(ms > 0) || !std::isfinite(ms)) return;
  const double x[3] = {1.0, static_cast<double>(prefill_tokens), static_cast<double>(decode_rows)};
  for (int i = 0; i < 3; ++i) {
    xty_[i] = decay_ * xty_[i] + x[i] * ms;
    for (int j = 0; j < 3; ++j) xtx_[i][j] = decay_ * xtx_[i][j] + x[i] * x[j];
  }
  ++observations_;
  prefill_steps_ += prefill_tokens > 0;
  solve();
}

// Weighted least squares, with a tiny ridge for the terms no step has varied
// yet.
void StepCostModel::solve() {
  double a[3][4];
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) a[i][j] = xtx_[i][j];
    a[i][3] = xty_[i];
  }
  for (int i = 0; i < 3; ++i) a[i][i] = a[i][i] * (1 + 1e-9) + 1e-9;
  for (int c = 0; c < 3; ++c) {
    int pivot = c;
    for (int r = c + 1; r < 3; ++r)
      if (std::fabs(a[r][c]) > std::fabs(a[pivot][c])) pivot = r;
    if (std::fabs(a[pivot][c]) < 1e-12) return;
    for (int k = 0; k < 4; ++k) std::swap(a[c][k], a[pivot][k]);
    for (int r = 0; r < 3; ++r) {
      if (r == c) continue;
      const double f = a[r][c] / a[c][c];
      for (int k = c; k < 4; ++k) a[r][k] -= f * a[c][k];
    }
  }
  // Costs cannot be negative; a negative fit goes to the fixed part.
  coef_ = {std::max(0.0, a[0][3] / a[0][0]), std::max(0.0, a[1][3] / a[1][1]),
           std::max(0.0, a[2][3] / a[2][2])};
}

double StepCostModel::predict(int prefill_tokens, int decode_rows) const {
  return coef_[0] + coef_[1] * prefill_tokens + coef_[2] * decode_rows;
}

int StepCostModel::tokens_within(double ms, int decode_rows) const {
  if (coef_[1] <= 0) return 0;
  const double left = ms - coef_[0] - coef_[2] * decode_rows;
  return left <= 0 ? 0 : static_cast<int>(left / coef_[1]);
}

}  // namespace tokenmill
