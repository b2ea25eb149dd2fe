// What a step costs: time as fixed + per_prefill_token * prompt tokens +
// per_decode_row * decode rows, fitted online from measured steps, so the
// model follows the device, the model and the dtype. Prompt tokens and decode
// rows are separate terms: a decode row pays for the LM head and a context's
// attention that a prompt token does not, and decode-only steps (the most
// frequent) must not blur the two.
#pragma once

#include <array>

namespace tokenmill {

class StepCostModel {
 public:
  // Older steps weigh `decay` times less with each new one.
  explicit StepCostModel(double decay = 0.98) : decay_(decay) {}

  void observe(int prefill_tokens, int decode_rows, double ms);
  // Whether enough steps, prefill among them, were seen to predict from.
  bool fitted() const {
    return observations_ >= kMinObservations && prefill_steps_ > 0 && coef_[1] > 0;
  }
  double predict(int prefill_tokens, int decode_rows) const;
  // Most prompt tokens a step with `decode_rows` can take within `ms` (0
  // when not even one fits).
  int tokens_within(double ms, int decode_rows) const;
  // {fixed ms, ms per prompt token, ms per decode row}
  const std::array<double, 3>& coefficients() const { return coef_; }

  static constexpr int kMinObservations = 8;

 private:
  void solve();

  double decay_;
  double xtx_[3][3] = {};
  double xty_[3] = {};
  int observations_ = 0;
  int prefill_steps_ = 0;
  std::array<double, 3> coef_{};
};

}  // namespace tokenmill
