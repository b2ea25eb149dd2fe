#include <algorithm>
#include <stdexcept>
#include <string>

#include "tokenmill/scheduler.h"

namespace tokenmill {

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
  if (reason != FinishReason::kAbort && config_.speculative.method == DraftMethod::kSuffix &&
      config_.speculative.num_tokens > 0)
    suffix_.add(seq.tokens.data() + seq.num_prompt_tokens, seq.num_output_tokens());
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

SchedulerStats Scheduler::stats() const {
  SchedulerStats st{};
  for (auto& kv : running_) st.num_running_seqs += kv.second->num_live();
  st.num_waiting_requests = static_cast<int>(waiting_.size());
  st.num_free_blocks = blocks_.num_free_blocks();
  st.num_blocks = blocks_.num_blocks();
  st.prefix = blocks_.prefix_stats();
  st.draft_tokens = draft_tokens_;
  st.accepted_tokens = accepted_tokens_;
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

void Scheduler::append_verified(Request& req, Sequence& seq, const int32_t* toks, int count,
                                int64_t first_sample, UpdateResult& result,
                                std::vector<RequestId>& done) {
  const int k = static_cast<int>(seq.draft.size());
  for (int j = 0; j + 1 < count; ++j)
    if (toks[j] != seq.draft[j])
      throw std::invalid_argument("update: token " + std::to_string(j) + " of sequence " +
                                  std::to_string(seq.id) + " differs from its draft token");
  draft_tokens_ += k;
  accepted_tokens_ += count - 1;
  req.acceptance.observe(count - 1, k);
  acceptance_.observe(count - 1, k);
  seq.draft.clear();
  for (int j = 0; j < count; ++j) {
    seq.tokens.push_back(toks[j]);
    result.events.push_back(
        {EventKind::kAppended, req.id, seq.id, -1, toks[j], FinishReason::kNone, first_sample + j});
    FinishReason reason;
    if (check_stop(req, seq, toks[j], reason)) {
      finish_seq(req, seq, reason, reason == FinishReason::kStop ? toks[j] : -1, &result);
      done.push_back(req.id);
      return;
    }
  }
  // The accepted drafts' KV was written with the tokens they turned out to
  // be; the rejected ones' blocks go.
  seq.num_computed += count - 1;
  blocks_.truncate(seq.block_table, blocks_.blocks_for(seq.num_computed + 1));
  blocks_.cache_full_blocks(seq.block_table, seq.tokens, seq.num_computed, req.params.cache_salt,
                            seq.hash_cursor);
}

void Scheduler::observe_step(const SchedulerOutput& out, double ms) {
  cost_.observe(out.shape(), ms);
  if (out.num_decode_seqs != out.num_seqs()) return;  // a prompt's share is not known
  int draft_rows = 0;
  for (int k : out.num_draft) draft_rows += k;
  verify_price_.observe(out.num_decode_seqs, draft_rows, ms);
}

void Scheduler::set_drafts(const SchedulerOutput& out) {
  for (int i = 0; i < out.num_seqs(); ++i) {
    const int k = out.num_draft[i];
    auto found = seqs_.find(out.seq_ids[i]);
    if (k == 0 || found == seqs_.end()) continue;
    const auto end = out.input_ids.begin() + out.query_start_loc[i + 1];
    found->second.seq->draft.assign(end - k, end);
  }
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
    if (out.num_draft[i] && counts[i] > out.num_draft[i] + 1)
      throw std::invalid_argument("update: sequence " + std::to_string(out.seq_ids[i]) +
                                  " verified " + std::to_string(out.num_draft[i]) +
                                  " draft tokens but is given " + std::to_string(counts[i]));
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
    if (out.num_draft[i]) {
      append_verified(req, *seq, toks, k, idx - k, result, done);
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

}  // namespace tokenmill
