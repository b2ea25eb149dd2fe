// Speculative decoding in the core: draft tokens proposed from a sequence's
// own text (n-gram prompt lookup), and how many of them a step verifies.
#pragma once

#include <cstdint>
#include <vector>

#include "tokenmill/step_cost.h"

namespace tokenmill {

struct SpeculativeConfig {
  int num_tokens = 0;  // most draft tokens per sequence and step; 0: off
  int min_ngram = 2;   // prompt lookup matches the last min..max tokens
  int max_ngram = 4;
};

// Up to `k` tokens that followed the latest earlier occurrence of the longest
// tail of `tokens` (min_n..max_n tokens) that occurs earlier, written to
// `draft` (replacing its contents).
void propose_ngram(const std::vector<int32_t>& tokens, int min_n, int max_n, int k,
                   std::vector<int32_t>& draft);

// How often a request's draft tokens were accepted: each verified draft
// token is a trial until the first rejection, older steps decaying.
class AcceptanceRate {
 public:
  double rate() const { return accepted_ / trials_; }
  void observe(int accepted, int proposed) {
    accepted_ = kDecay * accepted_ + accepted;
    trials_ = kDecay * trials_ + accepted + (accepted < proposed);
  }

 private:
  static constexpr double kDecay = 0.9;
  double accepted_ = 1, trials_ = 2;  // prior: one in two
};

// One decoding sequence's proposal: its acceptance rate and, in and out, its
// draft length.
struct DraftChoice {
  double rate;
  int length;
};

// Trims each proposal to the draft tokens worth verifying this step. Draft
// token j of a sequence is kept (with the j - 1 before it) with probability
// rate^j; the step cost model prices each as a decode row. Tokens are kept,
// likeliest first, while each raises the expected tokens per ms of the step,
// so speculation turns itself off for batches where verification costs more
// than it saves.
void choose_draft_lengths(std::vector<DraftChoice>& choices, int decode_rows,
                          const StepCostModel& cost);

}  // namespace tokenmill
