// Speculative decoding in the core: draft tokens proposed from a sequence's
// own text (n-gram prompt lookup) or recent outputs (suffix decoding), slots
// for a draft model's tokens, and how many of them a step verifies.
#pragma once

#include <cstdint>
#include <deque>
#include <unordered_map>
#include <vector>

#include "tokenmill/step_cost.h"

namespace tokenmill {

// kModel: the scheduler reserves a sequence's draft rows and the caller
// writes the draft model's tokens into them (Scheduler::set_drafts).
enum class DraftMethod { kNgram, kSuffix, kModel };

struct SpeculativeConfig {
  int num_tokens = 0;  // most draft tokens per sequence and step; 0: off
  DraftMethod method = DraftMethod::kNgram;
  // Most tokens of a step's decoding sequences, drafts included (the largest
  // decode graph); 0: no bound.
  int max_step_tokens = 0;
  int min_ngram = 2;  // prompt lookup matches the last min..max tokens
  int max_ngram = 4;
  // Suffix decoding: the depth of the tree of recent outputs, how many
  // requests' outputs it holds, drafts of at most spec_factor x the matched
  // length, and of tokens that followed at least this share of the matches.
  int suffix_max_depth = 24;
  int suffix_max_requests = 1000;
  double suffix_spec_factor = 1.0;
  double suffix_min_token_prob = 0.1;
};

// Up to `k` tokens that followed the latest earlier occurrence of the longest
// tail of `tokens` (min_n..max_n tokens) that occurs earlier, written to
// `draft` (replacing its contents). Returns the tail's length (0: none).
int propose_ngram(const std::vector<int32_t>& tokens, int min_n, int max_n, int k,
                  std::vector<int32_t>& draft);

// Suffix decoding's memory of what recent requests generated: a tree of
// every run of up to max_depth tokens of their outputs, each node counting
// how often its run occurred. A sequence's longest tail that the tree holds
// is followed, from the most frequent child on, while a child held at least
// min_prob of its parent's occurrences. The oldest outputs leave once
// max_requests are held.
class SuffixCache {
 public:
  SuffixCache(int max_depth, int max_requests);
  void add(const int32_t* tokens, int64_t n);
  // Up to `k` tokens continuing `tokens` into `draft` (replaced); returns the
  // length of the tail matched (0: none).
  int propose(const std::vector<int32_t>& tokens, int k, double spec_factor, double min_prob,
              std::vector<int32_t>& draft) const;
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size() - free_.size()); }

 private:
  struct Node {
    int32_t count = 0, token = -1, parent = -1;
    std::vector<int32_t> kids;
  };
  int32_t child(int32_t node, int32_t token) const;
  void count_runs(const std::vector<int32_t>& tokens, int delta);

  int max_depth_, max_requests_;
  std::vector<Node> nodes_;  // 0: the root
  std::vector<int32_t> free_;
  std::unordered_map<uint64_t, int32_t> edges_;  // (parent << 32 | token) -> node
  std::deque<std::vector<int32_t>> outputs_;
};

// How often draft tokens were accepted: each verified draft token is a trial
// until the first rejection, older steps decaying. A request's rate has the
// engine's rate over all requests as its prior, and that one an optimistic
// prior, so that drafting is tried before a measured acceptance decides.
class AcceptanceRate {
 public:
  // The observed rate, with `prior` counting as two trials.
  double rate(double prior) const {
    return (accepted_ + kPriorTrials * prior) / (trials_ + kPriorTrials);
  }
  void observe(int accepted, int proposed) {
    accepted_ = kDecay * accepted_ + accepted;
    trials_ = kDecay * trials_ + accepted + (accepted < proposed);
  }

 private:
  static constexpr double kDecay = 0.9, kPriorTrials = 2;
  double accepted_ = 0, trials_ = 0;
};

// What a verified draft row costs, measured per number of decoding
// sequences: decode-only steps with drafts against those without. The step
// cost model cannot tell a row's price where batch sizes never varied (a
// float32 model's 8-row steps took 36 ms against 21 ms for 4 rows while its
// fit said 1 ms a row); this compares like with like.
class VerifyPrice {
 public:
  static constexpr double kUnknown = -1, kPlain = -2;
  // The price of a row for this step of `seqs` decoding sequences (ms), or
  // kUnknown (price it from the cost model), or kPlain: draft nothing, so
  // that plain steps are measured (every 8th step until they are). Every
  // 64th step is priced kUnknown, so that a price that stopped drafting is
  // measured again.
  double next(int seqs);
  void observe(int seqs, int draft_rows, double ms);

 private:
  struct Mean {
    double ms = 0, rows = 0, weight = 0;
    void add(double m, double r) {
      ms = kDecay * ms + m;
      rows = kDecay * rows + r;
      weight = kDecay * weight + 1;
    }
  };
  struct Size {
    Mean plain, drafted;
    int64_t steps = 0;
  };
  static constexpr double kDecay = 0.95, kEnough = 4;
  std::vector<Size> sizes_;
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
// than it saves. At most max_drafts are kept in all. A draft model's forwards
// (draft_forward_ms each, one per draft position, shared by the batch) are
// priced by trying each depth whole.
// A measured row price (row_ms >= 0) replaces the cost model's.
void choose_draft_lengths(std::vector<DraftChoice>& choices, int decode_rows,
                          const StepCostModel& cost, int max_drafts = 1 << 30,
                          double draft_forward_ms = 0, double row_ms = -1);

}  // namespace tokenmill
