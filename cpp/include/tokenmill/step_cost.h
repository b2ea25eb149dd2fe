// What a step costs: time as fixed + per_prefill_token * prompt tokens +
// per_decode_row * decode rows + per_context * attention context, fitted
// online from measured steps, so the model follows the device, the model and
// the dtype. Prompt tokens and decode rows are separate terms: a decode row
// pays for the LM head that a prompt token does not, and decode-only steps
// (the most frequent) must not blur the two. The attention context (each
// query token times the context it attends to) is what grows with long
// sequences: a batch of decode rows over 2,000-token contexts reads more KV
// cache than weights.
#pragma once

#include <array>

namespace tokenmill {

struct StepShape {
  int prefill_tokens = 0;
  int decode_rows = 0;         // query tokens of decoding sequences, draft tokens included
  double prefill_context = 0;  // query tokens x their context, in thousands
  double decode_context = 0;
};

class StepCostModel {
 public:
  static constexpr int kTerms = 4;  // fixed, prompt token, decode row, context

  // Older steps weigh `decay` times less with each new one.
  explicit StepCostModel(double decay = 0.98) : decay_(decay) {}

  void observe(const StepShape& step, double ms);
  void observe(int prefill_tokens, int decode_rows, double ms) {
    observe(StepShape{prefill_tokens, decode_rows, 0, 0}, ms);
  }
  // Whether enough steps, prefill among them, were seen to predict from.
  bool fitted() const {
    return observations_ >= kMinObservations && prefill_steps_ > 0 && coef_[1] > 0;
  }
  double predict(const StepShape& step) const;
  double predict(int prefill_tokens, int decode_rows) const {
    return predict(StepShape{prefill_tokens, decode_rows, 0, 0});
  }
  // Most prompt tokens a step with `decode_rows` over `decode_context` can
  // take within `ms` (0 when not even one fits), each prompt token priced
  // with the context prompt tokens have had lately.
  int tokens_within(double ms, int decode_rows, double decode_context = 0) const;
  // {fixed ms, ms per prompt token, ms per decode row, ms per thousand context}
  const std::array<double, kTerms>& coefficients() const { return coef_; }

  static constexpr int kMinObservations = 8;

 private:
  void solve();

  double decay_;
  double xtx_[kTerms][kTerms] = {};
  double xty_[kTerms] = {};
  int observations_ = 0;
  int prefill_steps_ = 0;
  // Decayed sums of prompt tokens and their context, for the context of the next ones.
  double prefill_tokens_seen_ = 0, prefill_context_seen_ = 0;
  std::array<double, kTerms> coef_{};
};

}  // namespace tokenmill
