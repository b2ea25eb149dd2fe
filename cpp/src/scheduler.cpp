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
    : config_(config), blocks_(config.num_blocks, config.block_size, config.enable_prefix_caching) {
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

SeqId Scheduler::add_request(RequestId id, std::vector<int32_t> prompt,
                             const RequestParams& params) {
  if (requests_.count(id))
    throw std::invalid_argument("duplicate request id " + std::to_string(id));
  if (prompt.empty()) throw std::invalid_argument("prompt must contain at least one token");
  if (static_cast<int64_t>(prompt.size()) > config_.max_model_len)
    throw std::invalid_argument("prompt of " + std::to_string(prompt.size()) +
                                " tokens is longer than max_model_len " +
                                std::to_string(config_.max_model_len));
  if (params.max_tokens < 1) throw std::invalid_argument("max_tokens must be at least 1");
  if (params.min_tokens < 0 || params.min_tokens > params.max_tokens)
    throw std::invalid_argument("min_tokens must be in [0, max_tokens]");
  if (params.n < 1 || params.n > config_.max_num_seqs)
    throw std::invalid_argument(
        "n must be in [1, max_num_seqs=" + std::to_string(config_.max_num_seqs) + "]");
  // Preempted groups re-prefill each sequence separately, so the whole group
  // must fit without sharing to be sure to finish.
  const int64_t longest = std::min<int64_t>(static_cast<int64_t>(prompt.size()) + params.max_tokens,
                                            config_.max_model_len);
  const int64_t worst = static_cast<int64_t>(params.n) * blocks_.blocks_for(longest);
  if (worst > config_.num_blocks)
    throw std::invalid_argument("request needs up to " + std::to_string(worst) + " KV blocks (n=" +
                                std::to_string(params.n) + " x " + std::to_string(longest) +
                                " tokens) but the cache has " + std::to_string(config_.num_blocks));
  auto req = std::make_unique<Request>();
  req->id = id;
  req->params = params;
  req->arrival = next_arrival_++;
  auto seq = std::make_unique<Sequence>();
  seq->id = next_seq_id_++;
  seq->num_prompt_tokens = static_cast<int>(prompt.size());
  seq->tokens = std::move(prompt);
  SeqId sid = seq->id;
  seqs_[sid] = {req.get(), seq.get()};
  req->seqs.push_back(std::move(seq));
  waiting_.emplace(key(*req), req.get());
  requests_.emplace(id, std::move(req));
  return sid;
}

const Sequence* Scheduler::sequence(SeqId id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : it->second.seq;
}

void Scheduler::abort_request(RequestId id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  Request& req = *it->second;
  for (auto& s : req.seqs)
    if (s->status != SeqStatus::kFinished) finish_seq(req, *s, FinishReason::kAbort, -1, nullptr);
  release_if_done(id, nullptr);
}

void Scheduler::finish_sequence(SeqId id, FinishReason reason) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  Request& req = *it->second.req;
  if (it->second.seq->status != SeqStatus::kFinished)
    finish_seq(req, *it->second.seq, reason, -1, nullptr);
  release_if_done(req.id, nullptr);
}

std::vector<SeqEvent> UpdateResult::of(EventKind kind) const {
  std::vector<SeqEvent> found;
  for (const SeqEvent& e : events)
    if (e.kind == kind) found.push_back(e);
  return found;
}

Sequence& Scheduler::fork(Request& req, const Sequence& parent, UpdateResult& result) {
  auto child = std::make_unique<Sequence>(parent);
  child->id = next_seq_id_++;
  child->block_table = blocks_.fork(parent.block_table);
  seqs_[child->id] = {&req, child.get()};
  result.events.push_back({EventKind::kForked, req.id, child->id, parent.id});
  req.seqs.push_back(std::move(child));
  req.forked = true;
  return *req.seqs.back();
}

void Scheduler::finish_seq(Request& req, Sequence& seq, FinishReason reason, int32_t stop_token,
                           UpdateResult* result) {
  seq.status = SeqStatus::kFinished;
  seq.finish_reason = reason;
  seq.stop_token = stop_token;
  blocks_.free(seq.block_table);
  if (result)
    result->events.push_back({EventKind::kFinished, req.id, seq.id, -1, stop_token, reason});
}

void Scheduler::release_if_done(RequestId id, UpdateResult* result) {
  auto it = requests_.find(id);
  if (it == requests_.end() || !it->second->finished()) return;
  Request& req = *it->second;
  waiting_.erase(key(req));
  running_.erase(key(req));
  for (auto& s : req.seqs) seqs_.erase(s->id);
  if (result) result->finished_requests.push_back(id);
  requests_.erase(it);
}

void Scheduler::emit(const Request& req, Sequence& seq, int64_t num_new, SchedulerOutput& out) {
  const int bs = config_.block_size;
  out.seq_ids.push_back(seq.id);
  out.request_ids.push_back(req.id);
  emitted_.push_back(&seq);
  const int64_t start = seq.num_computed;
  for (int64_t p = start; p < start + num_new; ++p) {
    out.input_ids.push_back(seq.tokens[p]);
    out.positions.push_back(static_cast<int32_t>(p));
    out.slot_mapping.push_back(seq.block_table[p / bs] * bs + p % bs);
  }
  out.query_start_loc.push_back(out.num_tokens());
  seq.num_computed += num_new;
  out.seq_lens.push_back(static_cast<int32_t>(seq.num_computed));
  int samples = 0;
  if (seq.num_computed == static_cast<int64_t>(seq.tokens.size()))
    samples = req.forked ? 1 : req.params.n;
  out.num_samples.push_back(samples);
  if (samples) out.sample_rows.push_back(out.num_tokens() - 1);
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
  plan.clear();
  int tokens = 0, needed = 0;
  for (auto& s : req.seqs) {
    if (s->status != SeqStatus::kRunning) continue;
    int64_t remaining = static_cast<int64_t>(s->tokens.size()) - s->num_computed;
    int64_t num_new = remaining;
    if (config_.enable_chunked_prefill) num_new = std::min<int64_t>(remaining, budget - tokens);
    if (num_new <= 0 || tokens + num_new > budget) return true;  // next step
    plan.emplace_back(s.get(), num_new);
    tokens += static_cast<int>(num_new);
    needed += blocks_.blocks_needed(s->block_table, s->num_computed, s->num_computed + num_new);
  }
  if (needed > blocks_.num_free_blocks()) return false;
  for (auto& [seq, num_new] : plan) {
    try_allocate(*seq, num_new, out);
    emit(req, *seq, num_new, out);
  }
  budget -= tokens;
  return true;
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
  budget -= tokens;
  seq_slots -= width;
  waiting_.erase(key(req));
  running_.emplace(key(req), &req);
  return true;
}

// Running sequences of the request that have only their next token to compute.
static int decoding_rows(const Request& req) {
  int rows = 0;
  for (const auto& s : req.seqs)
    rows += s->status == SeqStatus::kRunning &&
            static_cast<int64_t>(s->tokens.size()) - s->num_computed == 1;
  return rows;
}

int Scheduler::token_budget(int decode_rows) const {
  const int most = config_.max_num_batched_tokens;
  if (config_.max_step_ms <= 0 || decode_rows == 0 || !cost_.fitted()) return most;
  const int fits = decode_rows + cost_.tokens_within(config_.max_step_ms, decode_rows);
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
  int running_width = 0, decode_rows = 0;
  for (auto& kv : running_) {
    order.push_back(kv.second);
    running_width += group_width(*kv.second);
    decode_rows += decoding_rows(*kv.second);
  }
  // Decoding requests first: a prefill chunk never takes the budget they need.
  std::stable_partition(order.begin(), order.end(),
                        [](const Request* r) { return decoding_rows(*r) > 0; });
  int budget = last_budget_ = token_budget(decode_rows);
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

bool Scheduler::check_stop(const Request& req, Sequence& seq, int32_t token,
                           FinishReason& reason) const {
  const RequestParams& p = req.params;
  const int n_out = seq.num_output_tokens();
  if (n_out >= p.min_tokens) {
    bool stop = !p.ignore_eos && p.eos_token_id >= 0 && token == p.eos_token_id;
    stop |= std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) !=
            p.stop_token_ids.end();
    if (stop) {
      reason = FinishReason::kStop;
      return true;
    }
  }
  if (n_out >= p.max_tokens || static_cast<int64_t>(seq.tokens.size()) >= config_.max_model_len) {
    reason = FinishReason::kLength;
    return true;
  }
  return false;
}

UpdateResult Scheduler::update(const SchedulerOutput& out, const int32_t* sampled,
                               int64_t num_sampled) {
  return update(out, sampled, num_sampled, out.num_samples.data());
}

UpdateResult Scheduler::update(const SchedulerOutput& out, const int32_t* tokens,
                               int64_t num_tokens, const int32_t* counts) {
  int64_t expected = 0;
  for (int i = 0; i < out.num_seqs(); ++i) {
    if (counts[i] < 0 || (counts[i] > 0 && out.num_samples[i] == 0))
      throw std::invalid_argument("update: sequence " + std::to_string(out.seq_ids[i]) +
                                  " sampled nothing this step but is given " +
                                  std::to_string(counts[i]) + " tokens");
    expected += counts[i];
  }
  if (expected != num_tokens)
    throw std::invalid_argument("update expects " + std::to_string(expected) +
                                " sampled tokens, got " + std::to_string(num_tokens));
  UpdateResult result;
  std::vector<RequestId> done;
  std::vector<Sequence*> targets;
  int64_t idx = 0;
  for (int i = 0; i < out.num_seqs(); ++i) {
    if (out.num_samples[i] == 0) continue;
    const int k = counts[i];
    const int32_t* toks = tokens + idx;
    idx += k;
    auto found = seqs_.find(out.seq_ids[i]);
    if (found == seqs_.end()) continue;  // aborted meanwhile
    Request& req = *found->second.req;
    Sequence* seq = found->second.seq;
    if (seq->status != SeqStatus::kRunning) continue;
    if (k == 0) {
      finish_seq(req, *seq, FinishReason::kAbort, -1, &result);
      done.push_back(req.id);
      continue;
    }
    targets.assign(1, seq);
    for (int j = 1; j < k; ++j) targets.push_back(&fork(req, *seq, result));
    for (int j = 0; j < k; ++j) {
      Sequence& s = *targets[j];
      s.tokens.push_back(toks[j]);
      result.events.push_back(
          {EventKind::kAppended, req.id, s.id, -1, toks[j], FinishReason::kNone, idx - k + j});
      FinishReason reason;
      if (check_stop(req, s, toks[j], reason)) {
        finish_seq(req, s, reason, reason == FinishReason::kStop ? toks[j] : -1, &result);
        done.push_back(req.id);
      }
    }
  }
  for (RequestId id : done) release_if_done(id, &result);
  return result;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats st{};
  for (auto& kv : running_) st.num_running_seqs += kv.second->num_live();
  st.num_waiting_requests = static_cast<int>(waiting_.size());
  st.num_free_blocks = blocks_.num_free_blocks();
  st.num_blocks = blocks_.num_blocks();
  st.prefix = blocks_.prefix_stats();
  return st;
}

void Scheduler::check_invariants() const {
  blocks_.check_consistency();
  std::vector<int> refs(blocks_.num_blocks(), 0);
  for (auto& kv : requests_)
    for (auto& s : kv.second->seqs) {
      if (s->status != SeqStatus::kRunning && !s->block_table.empty())
        throw std::logic_error("a sequence that is not running holds blocks");
      for (BlockId b : s->block_table) ++refs[b];
    }
  int used = 0;
  for (BlockId b = 0; b < blocks_.num_blocks(); ++b) {
    if (refs[b] != blocks_.ref_count(b))
      throw std::logic_error("block " + std::to_string(b) + " has ref count " +
                             std::to_string(blocks_.ref_count(b)) + " but " +
                             std::to_string(refs[b]) + " tables hold it");
    used += refs[b] > 0;
  }
  if (used + blocks_.num_free_blocks() != blocks_.num_blocks())
    throw std::logic_error("free + used != total blocks");
  if (requests_.empty() && blocks_.num_free_blocks() != blocks_.num_blocks())
    throw std::logic_error("blocks leaked after every request finished");
}

}  // namespace tokenmill
