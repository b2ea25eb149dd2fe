#include "tokenmill/speculation.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace tokenmill {

void propose_ngram(const std::vector<int32_t>& tokens, int min_n, int max_n, int k,
                   std::vector<int32_t>& draft) {
  draft.clear();
  const int64_t len = static_cast<int64_t>(tokens.size());
  const int32_t* t = tokens.data();
  for (int n = std::min<int64_t>(max_n, len - 1); n >= min_n && k > 0; --n) {
    const int32_t* tail = t + len - n;
    // Latest start p < len - n whose n tokens equal the tail.
    for (int64_t p = len - n - 1; p >= 0; --p) {
      if (t[p + n - 1] != tail[n - 1] || !std::equal(t + p, t + p + n - 1, tail)) continue;
      const int64_t from = p + n, to = std::min<int64_t>(from + k, len);
      draft.assign(t + from, t + to);
      return;
    }
  }
}

void choose_draft_lengths(std::vector<DraftChoice>& choices, int decode_rows,
                          const StepCostModel& cost) {
  // Until a fit exists, a row costs a tenth of a step's fixed part, as a
  // decode row of a small model does on a CPU.
  const bool fitted = cost.fitted();
  const double fixed = fitted ? cost.predict(0, decode_rows) : 10.0 + decode_rows;
  // A fit from steps of one batch size cannot tell a row's cost (it may come
  // out 0): a row then costs no less than a fiftieth of the fixed part.
  const auto& c = cost.coefficients();
  const double per_token = fitted ? std::max({c[2], 0.02 * c[0], 1e-6}) : 1.0;
  struct Gain {
    double p;
    int seq, index;
  };
  std::vector<Gain> gains;
  for (int s = 0; s < static_cast<int>(choices.size()); ++s) {
    double p = 1;
    for (int j = 1; j <= choices[s].length; ++j) gains.push_back({p *= choices[s].rate, s, j});
    choices[s].length = 0;
  }
  std::stable_sort(gains.begin(), gains.end(),
                   [](const Gain& a, const Gain& b) { return a.p > b.p; });
  double tokens = decode_rows, ms = fixed;
  for (const Gain& g : gains) {
    // Keeping token j means j - 1 before it are kept: rates are below one,
    // so likeliest-first keeps each proposal's tokens in order.
    if (g.p / per_token <= tokens / ms) break;
    tokens += g.p;
    ms += per_token;
    choices[g.seq].length = std::max(choices[g.seq].length, g.index);
  }
}

}  // namespace tokenmill
