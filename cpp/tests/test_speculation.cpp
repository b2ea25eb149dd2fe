#include <gtest/gtest.h>

#include <numeric>

#include "tokenmill/scheduler.h"

using namespace tokenmill;

TEST(Ngram, ProposesWhatFollowedTheLatestLongestMatch) {
  // tail "3 4" occurs twice before; the latest occurrence is followed by 9 9
  std::vector<int32_t> t{1, 3, 4, 5, 6, 2, 3, 4, 9, 9, 7, 3, 4};
  std::vector<int32_t> d;
  propose_ngram(t, 2, 4, 3, d);
  EXPECT_EQ(d, (std::vector<int32_t>{9, 9, 7}));
  // a longer match wins over a later shorter one: "2 3 4" only occurs at 5
  t = {2, 3, 4, 8, 1, 3, 4, 5, 2, 3, 4};
  propose_ngram(t, 2, 4, 2, d);
  EXPECT_EQ(d, (std::vector<int32_t>{8, 1}));
  propose_ngram({1, 2, 3, 4}, 2, 4, 3, d);
  EXPECT_TRUE(d.empty());
  // the draft stops at the end of the text
  propose_ngram({5, 6, 5, 6}, 2, 2, 4, d);
  EXPECT_EQ(d, (std::vector<int32_t>{5, 6}));
}

TEST(DraftLengths, SmallBatchesVerifyLikelyTokensLargeOnesNone) {
  StepCostModel cost;
  // fixed 5 ms, 0.5 ms a decode row, 0.05 a prompt token
  for (int i = 0; i < 40; ++i) {
    const int rows = 1 + (i * 7) % 64, prompt = (i % 3) * 100;
    cost.observe(prompt, rows, 5 + 0.05 * prompt + 0.5 * rows);
  }
  ASSERT_TRUE(cost.fitted());
  std::vector<DraftChoice> one{{0.9, 5}};
  choose_draft_lengths(one, 1, cost);
  EXPECT_EQ(one[0].length, 5);
  std::vector<DraftChoice> poor{{0.05, 5}};
  choose_draft_lengths(poor, 1, cost);
  EXPECT_EQ(poor[0].length, 0);
  std::vector<DraftChoice> many(64, DraftChoice{0.6, 5});
  choose_draft_lengths(many, 64, cost);
  for (const auto& c : many) EXPECT_EQ(c.length, 0);
}

namespace {

SchedulerConfig spec_config(int k) {
  SchedulerConfig c;
  c.num_blocks = 64;
  c.block_size = 4;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 64;
  c.max_model_len = 64;
  c.speculative.num_tokens = k;
  return c;
}

// A device where a step costs 5 ms and a verified token 0.05 ms more.
void cheap_rows(Scheduler& s) {
  for (int i = 0; i < 10; ++i)
    s.observe_step(i % 2 ? 100 : 0, 1 + i, 5 + 0.01 * (i % 2 ? 100 : 0) + 0.05 * (1 + i));
}

}  // namespace

TEST(Scheduler, DraftsAreVerifiedAndRejectedOnesRolledBack) {
  Scheduler s(spec_config(4));
  cheap_rows(s);
  RequestParams p;
  p.max_tokens = 20;
  s.add_request(1, {1, 2, 3, 4, 5, 6, 1, 2}, p);
  auto out = s.schedule();  // prefill
  int32_t tok = 3;
  s.update(*out, &tok, 1);
  // "1 2 3" occurred: the draft is what followed, 4 5 6 1
  out = s.schedule();
  ASSERT_EQ(out->num_draft.size(), 1u);
  ASSERT_EQ(out->num_draft[0], 4);
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{3, 4, 5, 6, 1}));
  EXPECT_EQ(out->positions, (std::vector<int32_t>{8, 9, 10, 11, 12}));
  EXPECT_EQ(out->seq_lens[0], 13);
  EXPECT_EQ(out->sample_rows, (std::vector<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(out->decode_tokens, 5);
  const SeqId seq = out->seq_ids[0];
  EXPECT_EQ(s.block_manager().blocks_for(13),
            static_cast<int>(s.sequence(seq)->block_table.size()));
  // accept 4 5, then the target says 9
  std::vector<int32_t> toks{4, 5, 9};
  int32_t count = 3;
  auto r = s.update(*out, toks.data(), 3, &count);
  EXPECT_EQ(r.of(EventKind::kAppended).size(), 3u);
  const Sequence* q = s.sequence(seq);
  EXPECT_EQ(q->tokens, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 9}));
  EXPECT_EQ(q->num_computed, 11);
  EXPECT_EQ(q->block_table.size(), 3u);  // 12 tokens: the draft's fourth block went
  s.check_invariants();
  EXPECT_EQ(s.stats().draft_tokens, 4);
  EXPECT_EQ(s.stats().accepted_tokens, 2);
  // a token that contradicts an accepted draft is refused
  out = s.schedule();
  if (out->num_draft[0] > 0) {
    std::vector<int32_t> wrong(2, -5);
    int32_t two = 2;
    EXPECT_THROW(s.update(*out, wrong.data(), 2, &two), std::invalid_argument);
  }
  s.abort_request(1);
  s.check_invariants();
}

TEST(Scheduler, DraftsStopAtStopTokensAndMaxTokens) {
  Scheduler s(spec_config(6));
  cheap_rows(s);
  RequestParams p;
  p.max_tokens = 3;
  p.eos_token_id = 5;
  s.add_request(1, {1, 2, 3, 4, 5, 6, 1, 2}, p);
  auto out = s.schedule();
  int32_t tok = 3;
  s.update(*out, &tok, 1);
  out = s.schedule();
  // two more tokens may come: one draft and the token after it
  ASSERT_EQ(out->num_draft[0], 1);
  std::vector<int32_t> toks{4, 8};
  int32_t count = 2;
  auto r = s.update(*out, toks.data(), 2, &count);
  auto fin = r.of(EventKind::kFinished);
  ASSERT_EQ(fin.size(), 1u);
  EXPECT_EQ(fin[0].reason, FinishReason::kLength);
  EXPECT_FALSE(s.has_unfinished());
  s.check_invariants();

  p.max_tokens = 10;
  s.add_request(2, {1, 2, 3, 4, 5, 6, 1, 2}, p);
  out = s.schedule();
  s.update(*out, &tok, 1);
  out = s.schedule();
  ASSERT_GE(out->num_draft[0], 3);  // of the 6 proposed, the likeliest
  // EOS accepted as a draft ends the sequence there
  std::vector<int32_t> upto_eos{4, 5, 6};
  count = 3;
  r = s.update(*out, upto_eos.data(), 3, &count);
  ASSERT_EQ(r.of(EventKind::kAppended).size(), 2u);
  EXPECT_EQ(r.of(EventKind::kFinished)[0].reason, FinishReason::kStop);
  s.check_invariants();
}

TEST(SuffixCache, ProposesTheMostFrequentContinuationOfTheLongestMatch) {
  SuffixCache cache(8, 3);
  const std::vector<int32_t> a{1, 2, 3, 4, 5}, b{1, 2, 3, 9, 9}, c{7, 2, 3, 4, 6};
  cache.add(a.data(), 5);
  cache.add(b.data(), 5);
  cache.add(c.data(), 5);
  std::vector<int32_t> d;
  // "2 3" was followed by 4 twice and 9 once; then 5 or 6 (half each)
  EXPECT_EQ(cache.propose({8, 2, 3}, 4, 10.0, 0.0, d), 2);
  EXPECT_EQ(d, (std::vector<int32_t>{4, 5}));
  // with min_prob 0.5, 4 (2/3) stays and 5 (2/3 x 1/2) goes
  cache.propose({8, 2, 3}, 4, 10.0, 0.5, d);
  EXPECT_EQ(d, (std::vector<int32_t>{4}));
  // the longer match "1 2 3" (twice: 4 and 9) wins over "2 3"; spec_factor bounds the draft
  EXPECT_EQ(cache.propose({1, 2, 3}, 4, 1.0, 0.0, d), 3);
  EXPECT_EQ(d.size(), 2u);
  EXPECT_EQ(cache.propose({42}, 4, 1.0, 0.0, d), 0);
  EXPECT_TRUE(d.empty());
  // a fourth output evicts the first: "4 5" is gone, every node of it freed
  const int64_t before = cache.num_nodes();
  const std::vector<int32_t> e{30, 31};
  cache.add(e.data(), 2);
  cache.propose({4}, 4, 10.0, 0.0, d);
  EXPECT_EQ(d, (std::vector<int32_t>{6}));
  EXPECT_LT(cache.num_nodes(), before);
}

TEST(Scheduler, SuffixDecodingDraftsWhatEarlierRequestsGenerated) {
  SchedulerConfig c = spec_config(4);
  c.speculative.method = DraftMethod::kSuffix;
  Scheduler s(c);
  cheap_rows(s);
  RequestParams p;
  p.max_tokens = 6;
  p.ignore_eos = true;
  const std::vector<int32_t> answer{50, 51, 52, 53, 54, 55};
  s.add_request(1, {9, 8, 7}, p);  // generates the answer, token by token
  for (int t = 0; s.has_unfinished(); ++t) {
    auto out = s.schedule();
    ASSERT_EQ(out->num_draft[0], 0);  // nothing to match yet
    s.update(*out, &answer[t], 1);
  }
  s.add_request(2, {1, 1, 1}, p);
  auto out = s.schedule();
  int32_t first = 50;
  s.update(*out, &first, 1);
  out = s.schedule();
  ASSERT_GT(out->num_draft[0], 0);  // 50 was followed by 51 52 ...
  EXPECT_EQ(out->input_ids[1], 51);
  s.abort_request(2);
  s.check_invariants();
}

TEST(DraftLengths, AStepKeepsAtMostMaxDrafts) {
  std::vector<DraftChoice> two{{0.9, 5}, {0.9, 5}};
  choose_draft_lengths(two, 2, StepCostModel{}, 6);
  EXPECT_EQ(two[0].length + two[1].length, 6);
  EXPECT_EQ(two[0].length, 3);  // likeliest first: the first tokens of both
}

TEST(Scheduler, DraftModelRowsAreReservedThenFilledByTheCaller) {
  SchedulerConfig c = spec_config(3);
  c.speculative.method = DraftMethod::kModel;
  Scheduler s(c);
  cheap_rows(s);
  RequestParams p;
  p.max_tokens = 20;
  s.add_request(1, {7, 8, 9}, p);  // no n-gram to match: the rows are the model's
  auto out = s.schedule();
  int32_t tok = 5;
  s.update(*out, &tok, 1);
  out = s.schedule();
  ASSERT_EQ(out->num_draft[0], 3);
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{5, 5, 5, 5}));  // placeholders: valid ids
  out->input_ids[1] = 11;
  out->input_ids[2] = 12;
  out->input_ids[3] = 13;
  s.set_drafts(*out);
  EXPECT_EQ(s.sequence(out->seq_ids[0])->draft, (std::vector<int32_t>{11, 12, 13}));
  std::vector<int32_t> toks{11, 4};  // 11 accepted, 12 rejected
  int32_t count = 2;
  s.update(*out, toks.data(), 2, &count);
  EXPECT_EQ(s.sequence(out->seq_ids[0])->tokens, (std::vector<int32_t>{7, 8, 9, 5, 11, 4}));
  s.check_invariants();
}

TEST(DraftLengths, ADraftModelsForwardIsPricedOncePerDepth) {
  StepCostModel cost;
  for (int i = 0; i < 40; ++i) {
    const int rows = 1 + (i * 7) % 64, prompt = (i % 3) * 100;
    cost.observe(prompt, rows, 5 + 0.05 * prompt + 0.5 * rows);
  }
  // At 0.9 acceptance: near-free draft forwards keep all 5 tokens, one as dear
  // as a target step none, and one of 1.5 ms stops where another depth's
  // forward costs more than its expected tokens bring.
  std::vector<DraftChoice> cheap{{0.9, 5}}, medium{{0.9, 5}}, dear{{0.9, 5}};
  choose_draft_lengths(cheap, 1, cost, 1 << 30, 0.1);
  EXPECT_EQ(cheap[0].length, 5);
  choose_draft_lengths(medium, 1, cost, 1 << 30, 1.5);
  EXPECT_GT(medium[0].length, 0);
  EXPECT_LT(medium[0].length, 5);
  choose_draft_lengths(dear, 1, cost, 1 << 30, 6.0);
  EXPECT_EQ(dear[0].length, 0);
}

TEST(Scheduler, RejectedDraftsLowerTheAcceptanceNewRequestsStartFrom) {
  // A new request's acceptance starts from the engine's: after a request whose
  // drafts were all rejected, the same proposal is trimmed where a fresh
  // engine verifies it whole.
  auto first_draft = [](Scheduler& s, RequestId id) {
    RequestParams p;
    p.max_tokens = 40;
    s.add_request(id, {1, 2, 3, 4, 5, 6, 1, 2}, p);
    auto out = s.schedule();
    int32_t tok = 3;
    s.update(*out, &tok, 1);
    out = s.schedule();
    return out->num_draft[0];
  };
  Scheduler fresh(spec_config(4));
  cheap_rows(fresh);
  EXPECT_EQ(first_draft(fresh, 1), 4);

  SchedulerConfig c = spec_config(4);
  c.speculative.min_ngram = 1;  // any earlier token is a match: always a draft
  Scheduler s(c);
  cheap_rows(s);
  RequestParams p;
  p.max_tokens = 40;
  s.add_request(7, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, p);
  int rejected = 0;
  for (int step = 0; step < 30 && s.has_request(7); ++step) {
    auto out = s.schedule();
    const int k = out->num_draft[0];
    // never the first draft token: each draft is rejected
    int32_t tok = k ? out->input_ids[1] % 10 + 1 : 1 + step % 10;
    s.update(*out, &tok, 1);
    rejected += k;
  }
  ASSERT_GT(rejected, 0);
  s.abort_request(7);
  EXPECT_LT(first_draft(s, 1), 4);
}

TEST(VerifyPrice, ARowIsPricedFromDraftedAgainstPlainStepsOfTheSameBatch) {
  VerifyPrice v;
  int plain_steps = 0;
  for (int i = 0; i < 32; ++i) plain_steps += v.next(4) == VerifyPrice::kPlain;
  EXPECT_EQ(plain_steps, 4);  // unmeasured: every 8th step is plain
  for (int i = 0; i < 8; ++i) {
    v.observe(4, 0, 20);  // 4 sequences: 20 ms plain,
    v.observe(4, 4, 36);  // 36 ms with 4 draft rows: 4 ms a row
    v.observe(1, 0, 10);
    v.observe(1, 5, 12);  // one sequence: 0.4 ms a row
  }
  int measured = 0;
  for (int i = 0; i < 128; ++i) {
    const double price = v.next(4);
    if (price == VerifyPrice::kUnknown) continue;  // every 64th: the cost model's again
    EXPECT_NEAR(price, 4.0, 1e-9);
    ++measured;
  }
  EXPECT_EQ(measured, 126);
  EXPECT_NEAR(v.next(1), 0.4, 1e-9);
  EXPECT_EQ(v.next(2), VerifyPrice::kUnknown);  // another size starts unmeasured
  // A dear row stops drafting where the cost model alone would draft.
  StepCostModel cost;
  for (int i = 0; i < 40; ++i) {
    const int rows = 1 + (i * 7) % 64, prompt = (i % 3) * 100;
    cost.observe(prompt, rows, 5 + 0.05 * prompt + 0.05 * rows);
  }
  std::vector<DraftChoice> fitted(4, DraftChoice{0.8, 5}), priced(4, DraftChoice{0.8, 5});
  choose_draft_lengths(fitted, 4, cost);
  choose_draft_lengths(priced, 4, cost, 1 << 30, 0, 4.0);
  EXPECT_GT(fitted[0].length, 0);
  for (const auto& c : priced) EXPECT_EQ(c.length, 0);
}
