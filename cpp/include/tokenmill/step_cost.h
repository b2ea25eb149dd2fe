// What a step costs: time as fixed + per_token * tokens + per_row * rows (a
// row is a sequence that samples: it pays for the LM head), fitted online from
// measured steps, so the model follows the device, the model and the dtype.
#pragma once

#include <array>

namespace tokenmill {

class StepCostModel {
 public:
  // Older steps weigh `decay` times less with each new one.
  explicit StepCostModel(double decay = 0.98) : decay_(decay) {}

  void observe(int tokens, int rows, double ms);
  // Whether enough steps, of varied sizes, were seen to predict from.
  bool fitted() const { return observations_ >= kMinObservations && coef_[1] > 0; }
  double predict(int tokens, int rows) const;
  // Most tokens a step of `rows` sampling rows can take within `ms` (0 when
  // not even one fits).
  int tokens_within(double ms, int rows) const;
  // {fixed ms, ms per token, ms per row}
  const std::array<double, 3>& coefficients() const { return coef_; }

  static constexpr int kMinObservations = 8;

 private:
  void solve();

  double decay_;
  double xtx_[3][3] = {};
  double xty_[3] = {};
  int observations_ = 0;
  std::array<double, 3> coef_{};
};

}  // namespace tokenmill
