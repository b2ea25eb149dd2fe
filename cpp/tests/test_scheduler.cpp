#include <gtest/gtest.h>

#include <numeric>

#include "tokenmill/scheduler.h"

using namespace tokenmill;

namespace {

SchedulerConfig small_config(int blocks, int budget = 64) {
  SchedulerConfig c;
  c.num_blocks = blocks;
  c.block_size = 4;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = budget;
  c.max_model_len = 32;
  return c;
}

std::vector<int32_t> prompt(int n, int start = 100) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}

RequestParams params(int max_tokens) {
  RequestParams p;
  p.max_tokens = max_tokens;
  return p;
}

// Samples token 7 for every sample and returns the update result.
UpdateResult step(Scheduler& s, std::unique_ptr<SchedulerOutput>& out) {
  out = s.schedule();
  int n = 0;
  for (int k : out->num_samples) n += k;
  std::vector<int32_t> sampled(n, 7);
  auto r = s.update(*out, sampled.data(), n);
  s.check_invariants();
  return r;
}

}  // namespace

TEST(Scheduler, PrefillThenDecodeUntilLength) {
  Scheduler s(small_config(16));
  s.add_request(1, prompt(6), params(3));
  std::unique_ptr<SchedulerOutput> out;
  step(s, out);
  EXPECT_EQ(out->num_tokens(), 6);
  EXPECT_EQ(out->seq_lens[0], 6);
  EXPECT_EQ(out->positions[5], 5);
  EXPECT_EQ(out->sample_rows.size(), 1u);
  step(s, out);
  EXPECT_EQ(out->num_tokens(), 1);
  EXPECT_EQ(out->positions[0], 6);
  auto finished = step(s, out).of(EventKind::kFinished);
  ASSERT_EQ(finished.size(), 1u);
  EXPECT_EQ(finished[0].reason, FinishReason::kLength);
  EXPECT_FALSE(s.has_unfinished());
  EXPECT_EQ(s.stats().num_free_blocks, 16);
}

TEST(Scheduler, SlotMappingFollowsBlockTable) {
  Scheduler s(small_config(16));
  SeqId id = s.add_request(1, prompt(9), params(2));
  auto out = s.schedule();
  const auto& table = s.sequence(id)->block_table;
  for (int p = 0; p < 9; ++p) EXPECT_EQ(out->slot_mapping[p], table[p / 4] * 4 + p % 4);
  EXPECT_EQ(out->max_blocks, 3);
}

TEST(Scheduler, ChunkedPrefillSplitsUnderBudget) {
  Scheduler s(small_config(16, /*budget=*/4));
  s.add_request(1, prompt(10), params(2));
  std::unique_ptr<SchedulerOutput> out;
  step(s, out);
  EXPECT_EQ(out->num_tokens(), 4);
  EXPECT_EQ(out->num_samples[0], 0);
  step(s, out);
  EXPECT_EQ(out->positions[0], 4);
  step(s, out);
  EXPECT_EQ(out->num_tokens(), 2);
  EXPECT_EQ(out->num_samples[0], 1);
}

TEST(Scheduler, StopTokenRespectsMinTokens) {
  Scheduler s(small_config(16));
  RequestParams p = params(10);
  p.eos_token_id = 7;
  p.min_tokens = 2;
  s.add_request(1, prompt(3), p);
  std::unique_ptr<SchedulerOutput> out;
  EXPECT_TRUE(step(s, out).of(EventKind::kFinished).empty());  // 1 token < min_tokens
  auto finished = step(s, out).of(EventKind::kFinished);
  ASSERT_EQ(finished.size(), 1u);
  EXPECT_EQ(finished[0].reason, FinishReason::kStop);
  EXPECT_EQ(finished[0].token, 7);
}

TEST(Scheduler, RejectsRequestsThatCanNeverRun) {
  Scheduler s(small_config(16));
  EXPECT_THROW(s.add_request(1, prompt(33), params(1)), std::invalid_argument);
  EXPECT_THROW(s.add_request(2, {}, params(1)), std::invalid_argument);
  EXPECT_THROW(s.add_request(3, prompt(3), params(0)), std::invalid_argument);
  s.add_request(4, prompt(3), params(1));
  EXPECT_THROW(s.add_request(4, prompt(3), params(1)), std::invalid_argument);
  EXPECT_THROW(Scheduler(small_config(4)), std::invalid_argument);  // 16 < 32 tokens
}

TEST(Scheduler, PreemptsLatestAndResumesWithSameTokens) {
  Scheduler s(small_config(8));  // 32 token slots
  s.add_request(1, prompt(12), params(12));
  s.add_request(2, prompt(12, 500), params(12));
  std::unique_ptr<SchedulerOutput> out;
  bool preempted = false;
  int guard = 0;
  while (s.has_unfinished() && guard++ < 200) {
    step(s, out);
    preempted |= !out->preempted.empty();
  }
  EXPECT_TRUE(preempted);
  EXPECT_FALSE(s.has_unfinished());
  EXPECT_EQ(s.stats().num_free_blocks, 8);
}

TEST(Scheduler, ForkSharesPromptBlocks) {
  Scheduler s(small_config(32));
  RequestParams p = params(4);
  p.n = 4;
  SeqId first = s.add_request(1, prompt(10), p);
  std::unique_ptr<SchedulerOutput> out;
  auto r = step(s, out);
  EXPECT_EQ(out->num_samples[0], 4);
  ASSERT_EQ(r.of(EventKind::kForked).size(), 3u);
  auto parent_table = s.sequence(first)->block_table;
  EXPECT_EQ(s.block_manager().ref_count(parent_table[0]), 4);
  step(s, out);  // each writes into the shared partial block: 3 copies
  EXPECT_EQ(out->num_seqs(), 4);
  EXPECT_EQ(out->block_copies.size(), 3u);
  while (s.has_unfinished()) step(s, out);
  EXPECT_EQ(s.stats().num_free_blocks, 32);
}

TEST(Scheduler, EventsComeInTheOrderMade) {
  Scheduler s(small_config(32));
  RequestParams p = params(1);
  p.n = 2;
  SeqId first = s.add_request(1, prompt(5), p);
  auto out = s.schedule();
  const int32_t sampled[] = {3, 4};
  auto r = s.update(*out, sampled, 2);
  ASSERT_EQ(r.events.size(), 5u);  // fork, then per sequence: append, finish
  EXPECT_EQ(r.events[0].kind, EventKind::kForked);
  EXPECT_EQ(r.events[0].parent, first);
  const SeqId child = r.events[0].seq_id;
  const EventKind kinds[] = {EventKind::kAppended, EventKind::kFinished, EventKind::kAppended,
                             EventKind::kFinished};
  const SeqId seqs[] = {first, first, child, child};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(r.events[i + 1].kind, kinds[i]);
    EXPECT_EQ(r.events[i + 1].seq_id, seqs[i]);
    EXPECT_EQ(r.events[i + 1].request_id, 1);
  }
  EXPECT_EQ(r.events[3].token, 4);
  EXPECT_EQ(r.finished_requests, std::vector<RequestId>{1});
}

// Beam search's shape: each sequence continues with as many tokens as it is
// given, and one given none is dropped.
TEST(Scheduler, CountsForkAndDropSequences) {
  Scheduler s(small_config(32));
  RequestParams p = params(8);
  p.n = 2;
  SeqId a = s.add_request(1, prompt(6), p);
  auto out = s.schedule();
  const int32_t first[] = {3, 4}, two[] = {2};
  s.update(*out, first, 2, two);
  s.check_invariants();
  out = s.schedule();
  ASSERT_EQ(out->num_seqs(), 2);
  const SeqId b = out->seq_ids[0] == a ? out->seq_ids[1] : out->seq_ids[0];
  const int32_t next[] = {5, 6, 7};
  const int32_t counts[] = {out->seq_ids[0] == a ? 3 : 0, out->seq_ids[0] == a ? 0 : 3};
  auto r = s.update(*out, next, 3, counts);
  s.check_invariants();
  auto finished = r.of(EventKind::kFinished);
  ASSERT_EQ(finished.size(), 1u);
  EXPECT_EQ(finished[0].seq_id, b);
  EXPECT_EQ(finished[0].reason, FinishReason::kAbort);
  EXPECT_EQ(r.of(EventKind::kForked).size(), 2u);
  EXPECT_EQ(s.sequence(a)->tokens.back(), 5);
  out = s.schedule();
  std::vector<int32_t> bad(out->num_seqs(), 0);  // one per scheduled sequence
  bad[0] = 1;
  EXPECT_THROW(s.update(*out, next, 2, bad.data()), std::invalid_argument);
  s.abort_request(1);
  EXPECT_EQ(s.stats().num_free_blocks, 32);
}

TEST(Scheduler, PrefixCacheHitSkipsComputedBlocks) {
  Scheduler s(small_config(32));
  s.add_request(1, prompt(13), params(1));
  std::unique_ptr<SchedulerOutput> out;
  step(s, out);
  s.add_request(2, prompt(13), params(1));
  step(s, out);
  EXPECT_EQ(out->num_tokens(), 1);  // 12 tokens came from the cache
  EXPECT_EQ(out->positions[0], 12);
  ASSERT_EQ(out->admitted.size(), 1u);
  EXPECT_EQ(out->admitted[0], std::make_pair(RequestId{2}, int32_t{12}));
}

TEST(Scheduler, AbortFreesBlocksImmediately) {
  Scheduler s(small_config(16));
  s.add_request(1, prompt(10), params(5));
  std::unique_ptr<SchedulerOutput> out;
  step(s, out);
  EXPECT_LT(s.stats().num_free_blocks, 16);
  s.abort_request(1);
  s.check_invariants();
  EXPECT_EQ(s.stats().num_free_blocks, 16);
  EXPECT_FALSE(s.has_unfinished());
}

TEST(StepCostModel, FitsALinearCostAndInvertsIt) {
  StepCostModel m;
  EXPECT_FALSE(m.fitted());
  for (int i = 0; i < 40; ++i) {
    const int rows = i % 7, prompt = i % 3 == 0 ? 0 : (i * 37) % 300;
    m.observe(prompt, rows, 5.0 + 0.5 * prompt + 2.0 * rows);
  }
  ASSERT_TRUE(m.fitted());
  EXPECT_NEAR(m.coefficients()[0], 5.0, 0.01);
  EXPECT_NEAR(m.coefficients()[1], 0.5, 0.001);
  EXPECT_NEAR(m.coefficients()[2], 2.0, 0.01);
  EXPECT_NEAR(m.predict(100, 4), 63.0, 0.05);
  EXPECT_EQ(m.tokens_within(63.1, 4), 100);
  EXPECT_EQ(m.tokens_within(12.0, 4), 0);
}

TEST(StepCostModel, DecodeStepsAloneDoNotFitPromptCost) {
  StepCostModel m;  // a decode row costs more than a prompt token; only mixed steps tell
  for (int i = 1; i <= 20; ++i) m.observe(0, i, 3.0 + 1.5 * i);
  EXPECT_FALSE(m.fitted());
  m.observe(200, 4, 3.0 + 0.1 * 200 + 1.5 * 4);
  m.observe(100, 0, 3.0 + 0.1 * 100);
  ASSERT_TRUE(m.fitted());
  EXPECT_NEAR(m.coefficients()[1], 0.1, 0.01);
  EXPECT_NEAR(m.coefficients()[2], 1.5, 0.01);
}

TEST(Scheduler, StepTimeTargetBoundsPrefillBesideDecodes) {
  SchedulerConfig c;
  c.num_blocks = 256;
  c.block_size = 4;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 512;
  c.max_model_len = 512;
  c.max_step_ms = 40;
  Scheduler s(c);
  // A synthetic device: 4 ms a step, 0.25 ms a prompt token, 1 ms a decode row.
  auto decoding = [](const SchedulerOutput& o) {
    int rows = 0;
    for (size_t i = 0; i + 1 < o.query_start_loc.size(); ++i)
      rows += o.query_start_loc[i + 1] - o.query_start_loc[i] == 1;
    return rows;
  };
  auto cost = [&](const SchedulerOutput& o) {
    return 4.0 + 0.25 * (o.num_tokens() - decoding(o)) + 1.0 * decoding(o);
  };
  for (int i = 0; i < 12; ++i) s.observe_step(29 * i, i % 4, 4.0 + 0.25 * 29 * i + 1.0 * (i % 4));
  for (int r = 0; r < 4; ++r) s.add_request(r, prompt(5, 10 * r), params(60));
  std::unique_ptr<SchedulerOutput> out;
  step(s, out);  // the four short prompts, then they decode
  ASSERT_EQ(out->num_tokens(), 20);
  s.add_request(9, prompt(400, 1000), params(4));
  int steps_with_prefill = 0, finished = 0;
  for (int k = 0; k < 200 && s.has_unfinished(); ++k) {
    auto r = step(s, out);
    finished += static_cast<int>(r.finished_requests.size());
    const int rows = decoding(*out);
    const bool prefill = out->num_tokens() > rows;
    steps_with_prefill += prefill;
    if (prefill && rows > 0) {
      EXPECT_LE(cost(*out), c.max_step_ms + 1e-9) << "step " << k;
      EXPECT_GE(out->num_tokens() - rows, c.block_size);  // the prompt still advances
    }
    s.observe_step(out->num_tokens() - rows, rows, cost(*out));
  }
  EXPECT_EQ(finished, 5);
  EXPECT_GE(steps_with_prefill, 3);  // the 400-token prompt took several chunks
}

TEST(StepCostModel, AttentionContextIsATermOfItsOwn) {
  StepCostModel m;
  for (int i = 0; i < 60; ++i) {
    StepShape st{i % 3 == 0 ? 0 : (i * 37) % 300, i % 9, (i % 4) * 0.7, (i * 13 % 11) * 1.3};
    m.observe(st, 2.0 + 0.1 * st.prefill_tokens + 0.5 * st.decode_rows +
                      3.0 * (st.prefill_context + st.decode_context));
  }
  ASSERT_TRUE(m.fitted());
  EXPECT_NEAR(m.coefficients()[0], 2.0, 0.01);
  EXPECT_NEAR(m.coefficients()[1], 0.1, 0.001);
  EXPECT_NEAR(m.coefficients()[2], 0.5, 0.01);
  EXPECT_NEAR(m.coefficients()[3], 3.0, 0.01);
  // long contexts of the decode rows leave room for fewer prompt tokens
  EXPECT_LT(m.tokens_within(50, 8, 10.0), m.tokens_within(50, 8, 1.0));
}

TEST(StepCostModel, CostsStayNonNegativeWhenStepsHaveFewShapes) {
  StepCostModel m;  // two shapes only: many fits explain them; none may go negative
  for (int i = 0; i < 30; ++i) {
    m.observe(StepShape{0, 16, 0, 0.13}, 1.9 + 0.01 * (i % 3));
    m.observe(StepShape{112, 0, 0.45, 0}, 2.55 + 0.01 * (i % 2));
  }
  ASSERT_TRUE(m.fitted());
  for (double c : m.coefficients()) EXPECT_GE(c, 0);
  EXPECT_NEAR(m.predict(StepShape{0, 16, 0, 0.13}), 1.91, 0.05);
  EXPECT_NEAR(m.predict(StepShape{112, 0, 0.45, 0}), 2.555, 0.05);
}

TEST(Scheduler, AWaitingRequestsAgeRaisesTheStepTarget) {
  SchedulerConfig c = small_config(64, 64);
  c.max_num_seqs = 1;  // the second request waits until the first is done
  c.max_model_len = 64;
  c.max_step_ms = 10;
  c.aging_steps = 4;
  Scheduler s(c);
  for (int i = 0; i < 12; ++i)
    s.observe_step(10 * i, 1 + i % 3, 2.0 + 0.5 * 10 * i + 1.0 * (1 + i % 3));
  s.add_request(1, prompt(4), params(30));
  std::unique_ptr<SchedulerOutput> out;
  step(s, out);
  s.add_request(2, prompt(40, 500), params(2));
  std::vector<int> budgets;
  for (int k = 0; k < 12; ++k) {
    step(s, out);
    budgets.push_back(s.last_token_budget());
  }
  EXPECT_GT(budgets.back(), budgets.front());
  EXPECT_TRUE(std::is_sorted(budgets.begin(), budgets.end()));
}
