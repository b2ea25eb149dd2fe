// Continuous-batching scheduler: token budget, chunked prefill, preemption by
// recompute, sequence groups, and flat step inputs ready for the kernels.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenmill/block_manager.h"
#include "tokenmill/speculation.h"
#include "tokenmill/step_cost.h"

namespace tokenmill {

using RequestId = int64_t;
using SeqId = int64_t;

struct SchedulerConfig {
  int num_blocks = 1024;
  int block_size = 16;
  int max_num_seqs = 256;
  int max_num_batched_tokens = 2048;
  int max_model_len = 2048;
  bool enable_chunked_prefill = true;
  bool enable_prefix_caching = true;
  bool priority_policy = false;  // false: first come, first served
  // Step-time target (ms) while sequences decode: a step then takes only the
  // prefill tokens the cost model predicts fit beside the decode rows (at
  // least a block's worth, so prompts still advance). 0: the token budget
  // alone. The target grows by itself for every aging_steps steps the
  // longest-waiting request has waited, so that TTFT stays bounded under load.
  double max_step_ms = 0;
  int aging_steps = 8;
  // Draft tokens for decoding sequences, verified in the same step.
  SpeculativeConfig speculative;
};

struct RequestParams {
  int max_tokens = 16;
  int min_tokens = 0;
  int n = 1;  // sequences forked from the prompt after prefill
  std::vector<int32_t> stop_token_ids;
  int32_t eos_token_id = -1;  // -1: none
  bool ignore_eos = false;
  int priority = 0;         // lower runs first under the priority policy
  uint64_t cache_salt = 0;  // isolates prefix-cache entries
  // Preemption restarts the request from its prompt (one sequence) instead of
  // recomputing every sequence; beam search, whose beams must advance
  // together, uses it.
  bool restart_on_preempt = false;
  // Whether its sequences may carry draft tokens (speculative decoding).
  bool speculate = true;
};

enum class SeqStatus { kWaiting, kRunning, kPreempted, kFinished };
enum class FinishReason { kNone, kStop, kLength, kAbort };

const char* to_string(FinishReason r);

struct Sequence {
  SeqId id;
  std::vector<int32_t> tokens;  // prompt followed by generated tokens
  int num_prompt_tokens;
  int64_t num_computed = 0;  // tokens whose KV is (being) written
  std::vector<BlockId> block_table;
  HashCursor hash_cursor;
  SeqStatus status = SeqStatus::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  int32_t stop_token = -1;  // the stop id that finished it, if any
  // Draft tokens scheduled after its next token this step, awaiting update().
  std::vector<int32_t> draft;

  int num_output_tokens() const { return static_cast<int>(tokens.size()) - num_prompt_tokens; }
};

struct Request {
  RequestId id;
  RequestParams params;
  uint64_t arrival;  // monotonically increasing admission order
  std::vector<std::unique_ptr<Sequence>> seqs;
  bool forked = false;        // n sequences exist (after the first sample)
  int waited_steps = 0;       // steps it has been waiting (to start or resume)
  AcceptanceRate acceptance;  // of its draft tokens

  int num_live() const;
  bool finished() const { return num_live() == 0; }
};

// What one engine step computes. Per scheduled sequence: its new tokens'
// offsets in the flat token arrays, its context length, and how many tokens
// to sample from its last row (0 while a prompt is still being chunked). A
// sequence with draft tokens (num_draft > 0) has them after its next token
// and a sample row for each of them and for that token: update() is then
// given the tokens it continues with, the accepted drafts then one more.
struct SchedulerOutput {
  std::vector<SeqId> seq_ids;
  std::vector<RequestId> request_ids;
  std::vector<int32_t> num_samples;
  std::vector<int32_t> input_ids;        // [num_tokens]
  std::vector<int32_t> positions;        // [num_tokens]
  std::vector<int32_t> slot_mapping;     // [num_tokens]
  std::vector<int32_t> query_start_loc;  // [num_seqs + 1]
  std::vector<int32_t> seq_lens;         // [num_seqs] context after step
  std::vector<int32_t> block_tables;     // [num_seqs, max_blocks] padded 0
  std::vector<int32_t> sample_rows;      // token rows whose logits sample
  std::vector<int32_t> num_draft;        // [num_seqs] draft tokens verified
  int decode_tokens = 0;                 // tokens of sequences past their prompt, drafts included
  int num_decode_seqs = 0;               // how many sequences, from the first, are decoding ones
  // Attention context (query tokens x the context each attends to, in
  // thousands) of the prompt tokens and of the decoding sequences' tokens.
  double prefill_context = 0, decode_context = 0;

  int max_blocks = 0;
  std::vector<BlockCopy> block_copies;  // perform before the forward
  std::vector<RequestId> preempted;
  std::vector<RequestId> aborted;  // could not fit in the cache even alone
  // Requests that started (or resumed) this step, with how many of their
  // prompt tokens the prefix cache already held.
  std::vector<std::pair<RequestId, int32_t>> admitted;

  int num_seqs() const { return static_cast<int>(seq_ids.size()); }
  StepShape shape() const {
    return {num_tokens() - decode_tokens, decode_tokens, prefill_context, decode_context};
  }
  int num_tokens() const { return static_cast<int>(input_ids.size()); }
};

enum class EventKind { kForked, kAppended, kFinished };

// One change update() made to a sequence, in the order made: a child forked
// from `parent`, a token appended (`sample`: its index in update()'s input),
// or the sequence finished (`token` is then the stop id that finished it, or -1).
struct SeqEvent {
  EventKind kind;
  RequestId request_id;
  SeqId seq_id;
  SeqId parent = -1;
  int32_t token = -1;
  FinishReason reason = FinishReason::kNone;
  int64_t sample = -1;
};

struct UpdateResult {
  std::vector<SeqEvent> events;
  std::vector<RequestId> finished_requests;

  std::vector<SeqEvent> of(EventKind kind) const;
};

struct SchedulerStats {
  int num_running_seqs;
  int num_waiting_requests;
  int num_free_blocks;
  int num_blocks;
  PrefixCacheStats prefix;
  int64_t draft_tokens;     // verified since start
  int64_t accepted_tokens;  // of those, accepted
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  // Queues a request; throws std::invalid_argument when it can never run.
  // Returns the id of its first sequence.
  SeqId add_request(RequestId id, std::vector<int32_t> prompt, const RequestParams& params);
  // Finishes every sequence of the request and frees its blocks. Unknown or
  // already finished ids are ignored.
  void abort_request(RequestId id);
  // Finishes one sequence (e.g. a stop string found by the detokenizer).
  void finish_sequence(SeqId id, FinishReason reason);

  std::unique_ptr<SchedulerOutput> schedule();
  // Continues each sampled sequence i of `out` with counts[i] tokens, taken
  // in order from `tokens`: the first extends the sequence, each further one
  // a child forked from it (sharing its blocks, copy on write); a count of 0
  // drops the sequence (finished as aborted). Then applies the stop
  // conditions. Sequences that sampled nothing must have a count of 0. A
  // sequence with draft tokens instead appends all of its 1..num_draft + 1
  // tokens: its accepted drafts (which must equal them), then one more; the
  // KV of rejected drafts is dropped.
  UpdateResult update(const SchedulerOutput& out, const int32_t* tokens, int64_t num_tokens,
                      const int32_t* counts);
  // The same with out.num_samples as the counts.
  UpdateResult update(const SchedulerOutput& out, const int32_t* sampled, int64_t num_sampled);
  // DraftMethod::kModel: takes each sequence's draft tokens from the rows of
  // `out.input_ids` that schedule() reserved for them (the caller wrote them).
  void set_drafts(const SchedulerOutput& out);
  // DraftMethod::kModel: the measured time of one draft-model forward.
  void set_draft_forward_ms(double ms) { draft_forward_ms_ = ms; }

  bool has_unfinished() const { return !requests_.empty(); }
  bool has_request(RequestId id) const { return requests_.count(id) > 0; }
  SchedulerStats stats() const;
  const SchedulerConfig& config() const { return config_; }
  const BlockManager& block_manager() const { return blocks_; }
  const Sequence* sequence(SeqId id) const;
  // Throws std::logic_error when any block-accounting invariant is broken.
  void check_invariants() const;
  // A step's measured time, for the cost model behind max_step_ms.
  void observe_step(const SchedulerOutput& out, double ms);
  void observe_step(int prefill_tokens, int decode_rows, double ms) {
    cost_.observe(prefill_tokens, decode_rows, ms);
  }
  const StepCostModel& cost_model() const { return cost_; }
  // The token budget the last schedule() chose.
  int last_token_budget() const { return last_budget_; }

 private:
  struct QueueKey {
    int priority;
    uint64_t arrival;
    bool operator<(const QueueKey& o) const {
      return priority != o.priority ? priority < o.priority : arrival < o.arrival;
    }
  };
  QueueKey key(const Request& r) const;

  bool schedule_running(Request& req, int& budget, SchedulerOutput& out);
  bool admit_waiting(Request& req, int& budget, int& seq_slots, SchedulerOutput& out);
  bool try_allocate(Sequence& seq, int64_t num_new, SchedulerOutput& out);
  void emit(const Request& req, Sequence& seq, int64_t num_new, SchedulerOutput& out);
  void preempt(Request& req, SchedulerOutput& out);
  void finish_seq(Request& req, Sequence& seq, FinishReason reason, int32_t stop_token,
                  UpdateResult* result);
  Sequence& fork(Request& req, const Sequence& parent, UpdateResult& result);
  void release_if_done(RequestId id, UpdateResult* result);
  bool check_stop(const Request& req, Sequence& seq, int32_t token, FinishReason& reason) const;
  int token_budget(int decode_rows, double decode_context, int waited_steps) const;
  void propose_drafts(const std::vector<Request*>& order, int decode_rows);
  bool speculates(const Request& req) const;
  void append_verified(Request& req, Sequence& seq, const int32_t* toks, int count,
                       int64_t first_sample, UpdateResult& result, std::vector<RequestId>& done);

  SchedulerConfig config_;
  BlockManager blocks_;
  std::unordered_map<RequestId, std::unique_ptr<Request>> requests_;
  struct SeqRef {
    Request* req;
    Sequence* seq;
  };
  std::unordered_map<SeqId, SeqRef> seqs_;
  // Per-step scratch, kept to avoid allocating on every step.
  std::vector<std::pair<Sequence*, int64_t>> plan_;
  std::vector<const Sequence*> emitted_;
  std::map<QueueKey, Request*> waiting_;
  std::map<QueueKey, Request*> running_;
  uint64_t next_arrival_ = 0;
  SeqId next_seq_id_ = 0;
  StepCostModel cost_;
  int last_budget_ = 0;
  int64_t draft_tokens_ = 0, accepted_tokens_ = 0;
  AcceptanceRate acceptance_;  // over all requests
  VerifyPrice verify_price_;
  static constexpr double kFirstAcceptance = 0.8;  // its prior
  double draft_forward_ms_ = 0;
  SuffixCache suffix_;  // outputs of finished requests, for suffix decoding
  std::vector<int32_t> other_draft_;
  std::vector<DraftChoice> choices_;
  std::vector<Sequence*> drafted_;
};

}  // namespace tokenmill
