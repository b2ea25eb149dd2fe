#include "tokenmill/scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace tokenmill {

const char* to_string(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    default:
      return "";
  }
}

int Request::num_live() const {
  int n = 0;
  for (const auto& s : seqs) n += s->status != SeqStatus::kFinished;
  return n;
}

static int group_width(const Request& r) { return r.forked ? r.num_live() : r.params.n; }

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config),
      blocks_(config.num_blocks, config.block_size, config.enable_prefix_caching),
      suffix_(config.speculative.suffix_max_depth, config.speculative.suffix_max_requests) {
  if (config.max_num_seqs <= 0 || config.max_num_batched_tokens <= 0 || config.max_model_len <= 0)
    throw std::invalid_argument(
        "max_num_seqs, max_num_batched_tokens and max_model_len must be "
        "positive");
  if (blocks_.blocks_for(config.max_model_len) > config.num_blocks)
    throw std::invalid_argument("KV cache of " + std::to_string(config.num_blocks) + " blocks x " +
                                std::to_string(config.block_size) +
                                " tokens cannot hold one sequence of max_model_len " +
                                std::to_string(config.max_model_len));
  if (!config.enable_chunked_prefill && config.max_num_batched_tokens < config.max_model_len)
    throw std::invalid_argument(
        "without chunked prefill, max_num_batched_tokens must be at least "
        "max_model_len");
}

Scheduler::QueueKey Scheduler::key(const Request& r) const {
  return {config_.priority_policy ? r.params.priority : 0, r.arrival};
}

const Sequence* Scheduler::sequence(SeqId id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : it->second.seq;
}

std::vector<SeqEvent> UpdateResult::of(EventKind kind) const {
  std::vector<SeqEvent> found;
  for (const SeqEvent& e : events)
    if (e.kind == kind) found.push_back(e);
  return found;
}

void Scheduler::emit(const Request& req, Sequence& seq, int64_t num_new, SchedulerOutput& out) {
  const int bs = config_.block_size;
  out.seq_ids.push_back(seq.id);
  out.request_ids.push_back(req.id);
  emitted_.push_back(&seq);
  const int64_t start = seq.num_computed;
  const int k = static_cast<int>(seq.draft.size());
  const int64_t real = num_new - k;  // drafts follow the sequence's own tokens
  for (int64_t p = start; p < start + num_new; ++p) {
    out.input_ids.push_back(p < start + real ? seq.tokens[p] : seq.draft[p - start - real]);
    out.positions.push_back(static_cast<int32_t>(p));
    out.slot_mapping.push_back(seq.block_table[p / bs] * bs + p % bs);
  }
  out.query_start_loc.push_back(out.num_tokens());
  // query i attends to start + i + 1 tokens
  const double context =
      (num_new * static_cast<double>(start) + num_new * (num_new + 1) / 2.0) / 1e3;
  if (start + 1 == static_cast<int64_t>(seq.tokens.size()) && seq.num_output_tokens() > 0) {
    if (out.num_decode_seqs + 1 == out.num_seqs()) ++out.num_decode_seqs;
    out.decode_tokens += num_new;
    out.decode_context += context;
  } else {
    out.prefill_context += context;
  }
  seq.num_computed += real;
  out.seq_lens.push_back(static_cast<int32_t>(seq.num_computed + k));
  int samples = 0;
  if (seq.num_computed == static_cast<int64_t>(seq.tokens.size()))
    samples = req.forked ? 1 : req.params.n;
  out.num_samples.push_back(samples);
  out.num_draft.push_back(k);
  if (samples)
    for (int j = k; j >= 0; --j) out.sample_rows.push_back(out.num_tokens() - 1 - j);
  blocks_.cache_full_blocks(seq.block_table, seq.tokens, seq.num_computed, req.params.cache_salt,
                            seq.hash_cursor);
}

bool Scheduler::try_allocate(Sequence& seq, int64_t num_new, SchedulerOutput& out) {
  if (blocks_.blocks_needed(seq.block_table, seq.num_computed, seq.num_computed + num_new) >
      blocks_.num_free_blocks())
    return false;
  blocks_.allocate(seq.block_table, seq.num_computed, seq.num_computed + num_new, out.block_copies);
  return true;
}

// Schedules every live sequence of a running request, or none of them.
// Returns false when the request needs blocks that are not free.
bool Scheduler::schedule_running(Request& req, int& budget, SchedulerOutput& out) {
  auto& plan = plan_;
  for (;;) {
    plan.clear();
    int tokens = 0, needed = 0;
    bool drafted = false;
    for (auto& s : req.seqs) {
      if (s->status != SeqStatus::kRunning) continue;
      int64_t remaining = static_cast<int64_t>(s->tokens.size()) - s->num_computed;
      if (!s->draft.empty()) {  // decoding: its drafts take what the budget leaves
        const int64_t room = std::max<int64_t>(0, budget - tokens - remaining);
        if (room < static_cast<int64_t>(s->draft.size())) s->draft.resize(room);
        remaining += static_cast<int64_t>(s->draft.size());
        drafted |= !s->draft.empty();
      }
      int64_t num_new = remaining;
      if (config_.enable_chunked_prefill) num_new = std::min<int64_t>(remaining, budget - tokens);
      if (num_new <= 0 || tokens + num_new > budget) return true;  // next step
      plan.emplace_back(s.get(), num_new);
      tokens += static_cast<int>(num_new);
      needed += blocks_.blocks_needed(s->block_table, s->num_computed, s->num_computed + num_new);
    }
    if (needed <= blocks_.num_free_blocks()) {
      for (auto& [seq, num_new] : plan) {
        try_allocate(*seq, num_new, out);
        emit(req, *seq, num_new, out);
      }
      budget -= tokens;
      return true;
    }
    if (!drafted) return false;
    for (auto& s : req.seqs) s->draft.clear();  // drafts never displace a request
  }
}

void Scheduler::preempt(Request& req, SchedulerOutput& out) {
  if (req.params.restart_on_preempt) {
    for (size_t i = 1; i < req.seqs.size(); ++i) {
      blocks_.free(req.seqs[i]->block_table);
      seqs_.erase(req.seqs[i]->id);
    }
    req.seqs.resize(1);
    req.seqs[0]->tokens.resize(req.seqs[0]->num_prompt_tokens);
    req.seqs[0]->status = SeqStatus::kRunning;  // reset below like any other
    req.forked = false;
  }
  for (auto& s : req.seqs) {
    if (s->status == SeqStatus::kFinished) continue;
    blocks_.free(s->block_table);
    s->draft.clear();
    s->num_computed = 0;
    s->hash_cursor = HashCursor{};
    s->status = SeqStatus::kPreempted;
  }
  running_.erase(key(req));
  waiting_.emplace(key(req), &req);
  out.preempted.push_back(req.id);
}

bool Scheduler::admit_waiting(Request& req, int& budget, int& seq_slots, SchedulerOutput& out) {
  const int width = group_width(req);
  if (width > seq_slots || budget <= 0) return false;
  const int bs = config_.block_size;
  struct Plan {
    Sequence* seq;
    std::vector<BlockId> hits;
    int64_t num_new;
  };
  std::vector<Plan> plans;
  int tokens = 0, needed = 0;
  bool resumed = false;
  for (auto& s : req.seqs) {
    if (s->status == SeqStatus::kFinished) continue;
    resumed |= s->status == SeqStatus::kPreempted;
    Plan p{s.get(), blocks_.find_cached_prefix(s->tokens, req.params.cache_salt), 0};
    int64_t cached = static_cast<int64_t>(p.hits.size()) * bs;
    int64_t remaining = static_cast<int64_t>(s->tokens.size()) - cached;
    // Sequences of a group that do not fit in this step's budget join the
    // running set with nothing scheduled and prefill in later steps.
    p.num_new = remaining;
    if (config_.enable_chunked_prefill) p.num_new = std::min<int64_t>(remaining, budget - tokens);
    if (p.num_new <= 0 || tokens + p.num_new > budget) {
      if (plans.empty()) return false;
      p.num_new = 0;
      p.hits.clear();
    }
    tokens += static_cast<int>(p.num_new);
    if (p.num_new > 0) {
      for (BlockId b : p.hits) needed += blocks_.ref_count(b) == 0;
      needed += blocks_.blocks_for(cached + p.num_new) - static_cast<int>(p.hits.size());
    }
    plans.push_back(std::move(p));
  }
  // A resumed request waits for headroom so that the running ones can grow
  // a block each without displacing it again at once.
  int headroom = resumed ? static_cast<int>(running_.size()) : 0;
  if (needed + headroom > blocks_.num_free_blocks()) return false;
  for (auto& p : plans) {
    p.seq->status = SeqStatus::kRunning;
    if (p.num_new == 0) continue;
    blocks_.attach(p.seq->block_table, p.hits);
    p.seq->num_computed = static_cast<int64_t>(p.hits.size()) * bs;
    if (!p.hits.empty())
      p.seq->hash_cursor = {static_cast<int>(p.hits.size()), blocks_.block_hash(p.hits.back())};
    try_allocate(*p.seq, p.num_new, out);
    emit(req, *p.seq, p.num_new, out);
  }
  out.admitted.emplace_back(req.id, static_cast<int32_t>(plans.front().hits.size()) * bs);
  req.waited_steps = 0;
  budget -= tokens;
  seq_slots -= width;
  waiting_.erase(key(req));
  running_.emplace(key(req), &req);
  return true;
}

bool Scheduler::speculates(const Request& req) const {
  return config_.speculative.num_tokens > 0 && req.params.speculate &&
         !req.params.restart_on_preempt && (req.forked || req.params.n == 1);
}

void Scheduler::propose_drafts(const std::vector<Request*>& order, int decode_rows) {
  const SpeculativeConfig& sc = config_.speculative;
  choices_.clear();
  drafted_.clear();
  const double prior = acceptance_.rate(kFirstAcceptance);
  const double row_ms = verify_price_.next(decode_rows);
  const bool allowed = row_ms != VerifyPrice::kPlain;
  for (Request* req : order) {
    const bool eligible = allowed && speculates(*req);
    for (auto& s : req->seqs) {
      s->draft.clear();
      const int64_t size = static_cast<int64_t>(s->tokens.size());
      if (!eligible || s->status != SeqStatus::kRunning || size - s->num_computed != 1) continue;
      // Tokens past max_tokens or max_model_len would never be kept.
      const int64_t left = std::min<int64_t>(req->params.max_tokens - s->num_output_tokens(),
                                             config_.max_model_len - size) -
                           1;
      if (left <= 0) continue;
      const int k = static_cast<int>(std::min<int64_t>(sc.num_tokens, left));
      // A draft model's tokens are written later; until then, valid ids.
      const int own = sc.method == DraftMethod::kModel
                          ? (s->draft.assign(k, s->tokens.back()), k)
                          : propose_ngram(s->tokens, sc.min_ngram, sc.max_ngram, k, s->draft);
      // Suffix decoding: recent outputs, where they match a longer tail.
      if (sc.method == DraftMethod::kSuffix &&
          suffix_.propose(s->tokens, k, sc.suffix_spec_factor, sc.suffix_min_token_prob,
                          other_draft_) > own)
        s->draft.swap(other_draft_);
      if (s->draft.empty()) continue;
      choices_.push_back({req->acceptance.rate(prior), static_cast<int>(s->draft.size())});
      drafted_.push_back(s.get());
    }
  }
  const int room = sc.max_step_tokens > 0 ? sc.max_step_tokens - decode_rows : 1 << 30;
  choose_draft_lengths(choices_, decode_rows, cost_, std::max(0, room),
                       sc.method == DraftMethod::kModel ? draft_forward_ms_ : 0.0, row_ms);
  for (size_t i = 0; i < drafted_.size(); ++i) drafted_[i]->draft.resize(choices_[i].length);
}

// Running sequences of the request that have only their next token to compute.
static int decoding_rows(const Request& req) {
  int rows = 0;
  for (const auto& s : req.seqs)
    rows += s->status == SeqStatus::kRunning &&
            static_cast<int64_t>(s->tokens.size()) - s->num_computed == 1;
  return rows;
}

// Their attention context, in thousands of tokens.
static double decoding_context(const Request& req) {
  double context = 0;
  for (const auto& s : req.seqs)
    if (s->status == SeqStatus::kRunning &&
        static_cast<int64_t>(s->tokens.size()) - s->num_computed == 1)
      context += static_cast<double>(s->tokens.size()) / 1e3;
  return context;
}

int Scheduler::token_budget(int decode_rows, double decode_context, int waited_steps) const {
  const int most = config_.max_num_batched_tokens;
  if (config_.max_step_ms <= 0 || decode_rows == 0 || !cost_.fitted()) return most;
  const double target = config_.max_step_ms * (1.0 + static_cast<double>(waited_steps) /
                                                         std::max(1, config_.aging_steps));
  const int fits = decode_rows + cost_.tokens_within(target, decode_rows, decode_context);
  return std::clamp(fits, std::min(most, decode_rows + config_.block_size), most);
}

std::unique_ptr<SchedulerOutput> Scheduler::schedule() {
  auto out = std::make_unique<SchedulerOutput>();
  out->query_start_loc.push_back(0);
  emitted_.clear();
  const size_t expect = running_.size() + waiting_.size();
  for (auto* v : {&out->input_ids, &out->positions, &out->slot_mapping}) v->reserve(expect);
  for (auto* v : {&out->num_samples, &out->seq_lens, &out->sample_rows}) v->reserve(expect);
  out->seq_ids.reserve(expect);
  out->request_ids.reserve(expect);
  out->query_start_loc.reserve(expect + 1);
  std::vector<Request*> order;
  order.reserve(running_.size());
  int running_width = 0, decode_rows = 0, waited = 0;
  double decode_context = 0;
  for (auto& kv : running_) {
    order.push_back(kv.second);
    running_width += group_width(*kv.second);
    decode_rows += decoding_rows(*kv.second);
    decode_context += decoding_context(*kv.second);
  }
  for (auto& kv : waiting_) waited = std::max(waited, kv.second->waited_steps);
  // Decoding requests first: a prefill chunk never takes the budget they need.
  std::stable_partition(order.begin(), order.end(),
                        [](const Request* r) { return decoding_rows(*r) > 0; });
  int budget = last_budget_ = token_budget(decode_rows, decode_context, waited);
  if (config_.speculative.num_tokens > 0) propose_drafts(order, decode_rows);
  size_t end = order.size();
  for (size_t i = 0; i < end && budget > 0; ++i) {
    Request& req = *order[i];
    while (!schedule_running(req, budget, *out)) {
      if (end - 1 > i) {
        preempt(*order[--end], *out);
        continue;
      }
      if (i == 0) {
        // Alone and still out of blocks: it can never fit, so stop it
        // rather than loop.
        for (auto& s : req.seqs)
          if (s->status != SeqStatus::kFinished)
            finish_seq(req, *s, FinishReason::kAbort, -1, nullptr);
        out->aborted.push_back(req.id);
        release_if_done(req.id, nullptr);
      } else {
        preempt(req, *out);
      }
      --end;
      break;
    }
  }

  // Preempted or aborted requests left running_, so its width is recounted
  // only when that happened.
  if (!out->preempted.empty() || !out->aborted.empty()) {
    running_width = 0;
    for (auto& kv : running_) running_width += group_width(*kv.second);
  }
  int seq_slots = config_.max_num_seqs - running_width;
  if (out->preempted.empty()) {
    std::vector<Request*> candidates;
    for (auto& kv : waiting_) candidates.push_back(kv.second);
    for (Request* req : candidates)
      if (!admit_waiting(*req, budget, seq_slots, *out)) break;
  }
  for (auto& kv : waiting_) ++kv.second->waited_steps;

  int max_blocks = 0;
  for (const Sequence* s : emitted_)
    max_blocks = std::max(max_blocks, static_cast<int>(s->block_table.size()));
  out->max_blocks = max_blocks;
  out->block_tables.resize(emitted_.size() * max_blocks);
  for (size_t i = 0; i < emitted_.size(); ++i) {
    const auto& t = emitted_[i]->block_table;
    auto row = out->block_tables.begin() + i * max_blocks;
    std::fill(std::copy(t.begin(), t.end(), row), row + max_blocks, 0);
  }
  return out;
}

}  // namespace tokenmill
