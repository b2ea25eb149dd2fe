#include <gtest/gtest.h>

#include <numeric>

#include "tokenmill/block_manager.h"

using namespace tokenmill;

static std::vector<int32_t> iota_tokens(int n, int start = 0) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}

TEST(FreeBlockQueue, PopsInOrderAndRemovesFromMiddle) {
  FreeBlockQueue q(4);
  for (int b = 0; b < 4; ++b) q.push_back(b);
  q.remove(2);
  EXPECT_EQ(q.size(), 3);
  EXPECT_EQ(q.pop_front(), 0);
  EXPECT_EQ(q.pop_front(), 1);
  EXPECT_EQ(q.pop_front(), 3);
  EXPECT_EQ(q.size(), 0);
}

TEST(BlockManager, AllocateAndFreeReturnsEveryBlock) {
  BlockManager bm(8, 4, false);
  std::vector<BlockId> table;
  std::vector<BlockCopy> copies;
  EXPECT_EQ(bm.blocks_needed(table, 0, 10), 3);
  bm.allocate(table, 0, 10, copies);
  EXPECT_EQ(table.size(), 3u);
  EXPECT_EQ(bm.num_free_blocks(), 5);
  bm.allocate(table, 10, 13, copies);  // grows to 4 blocks
  EXPECT_EQ(table.size(), 4u);
  EXPECT_TRUE(copies.empty());
  bm.free(table);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  bm.check_consistency();
}

TEST(BlockManager, ForkSharesAndCopiesOnWrite) {
  BlockManager bm(8, 4, false);
  std::vector<BlockId> parent;
  std::vector<BlockCopy> copies;
  bm.allocate(parent, 0, 6, copies);  // 2 blocks, last one half full
  auto child = bm.fork(parent);
  EXPECT_EQ(bm.ref_count(parent[1]), 2);
  EXPECT_EQ(bm.blocks_needed(child, 6, 7), 1);  // copy-on-write
  bm.allocate(child, 6, 7, copies);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, parent[1]);
  EXPECT_EQ(copies[0].dst, child[1]);
  EXPECT_NE(child[1], parent[1]);
  EXPECT_EQ(child[0], parent[0]);
  EXPECT_EQ(bm.ref_count(parent[1]), 1);
  bm.allocate(parent, 6, 7, copies);  // sole owner now: writes in place
  EXPECT_EQ(copies.size(), 1u);
  bm.free(parent);
  bm.free(child);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  bm.check_consistency();
}

TEST(BlockManager, PrefixCacheReusesTheSamePhysicalBlocks) {
  BlockManager bm(16, 4, true);
  auto tokens = iota_tokens(13);
  std::vector<BlockId> a;
  std::vector<BlockCopy> copies;
  bm.allocate(a, 0, 13, copies);
  HashCursor cur;
  bm.cache_full_blocks(a, tokens, 13, 0, cur);
  EXPECT_EQ(cur.num_blocks, 3);

  auto hits = bm.find_cached_prefix(tokens, 0);
  ASSERT_EQ(hits.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(hits[i], a[i]);
  EXPECT_TRUE(bm.find_cached_prefix(tokens, /*salt=*/7).empty());

  // Freed blocks keep their content until evicted.
  bm.free(a);
  hits = bm.find_cached_prefix(tokens, 0);
  EXPECT_EQ(hits.size(), 3u);
  std::vector<BlockId> b;
  bm.attach(b, hits);
  EXPECT_EQ(bm.ref_count(hits[0]), 1);
  EXPECT_EQ(bm.num_free_blocks(), 13);
  bm.free(b);
  bm.check_consistency();
  EXPECT_GT(bm.prefix_stats().hits, 0);
}

TEST(BlockManager, PrefixHitLeavesOneTokenToCompute) {
  BlockManager bm(8, 4, true);
  auto tokens = iota_tokens(8);
  std::vector<BlockId> a;
  std::vector<BlockCopy> copies;
  bm.allocate(a, 0, 8, copies);
  HashCursor cur;
  bm.cache_full_blocks(a, tokens, 8, 0, cur);
  EXPECT_EQ(bm.find_cached_prefix(tokens, 0).size(), 1u);
}

TEST(BlockManager, EvictsTailBlocksBeforeHeadBlocks) {
  BlockManager bm(4, 2, true);
  auto tokens = iota_tokens(8);
  std::vector<BlockId> a;
  std::vector<BlockCopy> copies;
  bm.allocate(a, 0, 8, copies);
  HashCursor cur;
  bm.cache_full_blocks(a, tokens, 8, 0, cur);
  bm.free(a);
  std::vector<BlockId> other;
  bm.allocate(other, 0, 2, copies);  // evicts exactly one cached block
  EXPECT_EQ(other[0], a[3]);
  auto tokens9 = iota_tokens(9);
  EXPECT_EQ(bm.find_cached_prefix(tokens9, 0).size(), 3u);  // head survives
  bm.free(other);
  bm.check_consistency();
}
