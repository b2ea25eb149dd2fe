#include "tokenmill/speculation.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace tokenmill {

int propose_ngram(const std::vector<int32_t>& tokens, int min_n, int max_n, int k,
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
      return n;
    }
  }
  return 0;
}

void choose_draft_lengths(std::vector<DraftChoice>& choices, int decode_rows,
                          const StepCostModel& cost, int max_drafts, double draft_forward_ms,
                          double row_ms) {
  // Until a fit exists, a row costs a tenth of a step's fixed part, as a
  // decode row of a small model does on a CPU.
  const bool fitted = cost.fitted();
  const double fixed = fitted ? cost.predict(0, decode_rows) : 10.0 + decode_rows;
  // A fit from steps of one batch size cannot tell a row's cost (it may come
  // out 0): a row then costs no less than a fiftieth of the fixed part.
  const auto& c = cost.coefficients();
  const double per_token = row_ms >= 0 ? std::max(row_ms, 1e-6)
                           : fitted    ? std::max({c[2], 0.02 * c[0], 1e-6})
                                       : 1.0;
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
  // Tokens kept likeliest first, none deeper than `depth`, while each raises
  // the expected tokens per ms; returns that rate.
  auto keep = [&](int depth, bool write) {
    double tokens = decode_rows, ms = fixed + depth * draft_forward_ms;
    int kept = 0;
    for (const Gain& g : gains) {
      if (g.index > depth) continue;
      if (kept++ >= max_drafts) break;
      // Keeping token j means j - 1 before it are kept: rates are below one,
      // so likeliest-first keeps each proposal's tokens in order.
      if (g.p / per_token <= tokens / ms) break;
      tokens += g.p;
      ms += per_token;
      if (write) choices[g.seq].length = std::max(choices[g.seq].length, g.index);
    }
    return tokens / ms;
  };
  int most = 0;
  for (const Gain& g : gains) most = std::max(most, g.index);
  // A draft model runs a forward per depth, shared by the batch: each depth
  // is tried whole. Other proposers cost nothing: the deepest is best.
  int best = most;
  if (draft_forward_ms > 0) {
    double best_rate = keep(0, false);
    best = 0;
    for (int depth = 1; depth <= most; ++depth) {
      const double rate = keep(depth, false);
      if (rate > best_rate) best_rate = rate, best = depth;
    }
  }
  keep(best, true);
}

double VerifyPrice::next(int seqs) {
  if (seqs <= 0) return kUnknown;
  if (static_cast<int>(sizes_.size()) <= seqs) sizes_.resize(seqs + 1);
  Size& s = sizes_[seqs];
  const int64_t step = s.steps++;
  if (s.plain.weight < kEnough) return step % 8 == 7 ? kPlain : kUnknown;
  if (s.drafted.weight < kEnough || step % 64 == 63) return kUnknown;
  const double extra = s.drafted.ms / s.drafted.weight - s.plain.ms / s.plain.weight;
  return std::max(0.0, extra / (s.drafted.rows / s.drafted.weight));
}

void VerifyPrice::observe(int seqs, int draft_rows, double ms) {
  if (seqs <= 0 || ms <= 0) return;
  if (static_cast<int>(sizes_.size()) <= seqs) sizes_.resize(seqs + 1);
  (draft_rows ? sizes_[seqs].drafted : sizes_[seqs].plain).add(ms, draft_rows);
}

static uint64_t edge_key(int32_t parent, int32_t token) {
  return static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32 | static_cast<uint32_t>(token);
}

SuffixCache::SuffixCache(int max_depth, int max_requests)
    : max_depth_(std::max(1, max_depth)), max_requests_(std::max(1, max_requests)), nodes_(1) {}

int32_t SuffixCache::child(int32_t node, int32_t token) const {
  auto it = edges_.find(edge_key(node, token));
  return it == edges_.end() ? -1 : it->second;
}

void SuffixCache::count_runs(const std::vector<int32_t>& tokens, int delta) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    int32_t node = 0;
    for (int64_t j = i; j < std::min<int64_t>(n, i + max_depth_); ++j) {
      int32_t next = child(node, tokens[j]);
      if (next < 0) {
        if (delta < 0) break;  // (never counted)
        if (!free_.empty()) {
          next = free_.back();
          free_.pop_back();
          nodes_[next] = Node{};
        } else {
          next = static_cast<int32_t>(nodes_.size());
          nodes_.emplace_back();
        }
        nodes_[next].token = tokens[j];
        nodes_[next].parent = node;
        nodes_[node].kids.push_back(next);
        edges_[edge_key(node, tokens[j])] = next;
      }
      nodes_[next].count += delta;
      if (nodes_[next].count == 0) {  // the last run through it left
        auto& kids = nodes_[node].kids;
        kids.erase(std::find(kids.begin(), kids.end(), next));
        edges_.erase(edge_key(node, tokens[j]));
        // Its subtree counted only runs through it, which all left too.
        std::vector<int32_t> stack{next};
        while (!stack.empty()) {
          const int32_t x = stack.back();
          stack.pop_back();
          for (int32_t k : nodes_[x].kids) {
            edges_.erase(edge_key(x, nodes_[k].token));
            stack.push_back(k);
          }
          nodes_[x] = Node{};
          free_.push_back(x);
        }
        break;
      }
      node = next;
    }
  }
}

void SuffixCache::add(const int32_t* tokens, int64_t n) {
  if (n <= 0) return;
  outputs_.emplace_back(tokens, tokens + n);
  count_runs(outputs_.back(), 1);
  while (static_cast<int>(outputs_.size()) > max_requests_) {
    count_runs(outputs_.front(), -1);
    outputs_.pop_front();
  }
}

int SuffixCache::propose(const std::vector<int32_t>& tokens, int k, double spec_factor,
                         double min_prob, std::vector<int32_t>& draft) const {
  draft.clear();
  const int64_t len = static_cast<int64_t>(tokens.size());
  // The longest tail the tree holds: try the longest first.
  for (int64_t m = std::min<int64_t>(max_depth_ - 1, len); m >= 1; --m) {
    int32_t node = 0;
    for (int64_t j = len - m; j < len && node >= 0; ++j) node = child(node, tokens[j]);
    if (node < 0 || nodes_[node].kids.empty()) continue;
    const int most = std::min<int>(k, static_cast<int>(std::ceil(spec_factor * m)));
    double prob = 1;
    while (static_cast<int>(draft.size()) < most && !nodes_[node].kids.empty()) {
      int32_t best = -1;
      for (int32_t c : nodes_[node].kids)
        if (best < 0 || nodes_[c].count > nodes_[best].count) best = c;
      prob *= static_cast<double>(nodes_[best].count) / nodes_[node].count;
      if (prob < min_prob) break;
      draft.push_back(nodes_[best].token);
      node = best;
    }
    return static_cast<int>(m);
  }
  return 0;
}

}  // namespace tokenmill
