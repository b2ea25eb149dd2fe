// Paged KV-cache block manager: fixed-size blocks, reference counts,
// copy-on-write forks and content-hash prefix caching.
#pragma once

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tokenmill {

using BlockId = int32_t;
using BlockHash = uint64_t;

struct BlockCopy {
  BlockId src;
  BlockId dst;
};

// How far one block table's hash chain has been computed.
struct HashCursor {
  int num_blocks = 0;
  BlockHash last = 0;
};

struct PrefixCacheStats {
  int64_t queries = 0;  // full blocks looked up
  int64_t hits = 0;     // full blocks found in the cache
};

// Intrusive doubly-linked list over block ids: O(1) push, pop and removal of
// any member, which eviction of a cached free block needs.
class FreeBlockQueue {
 public:
  explicit FreeBlockQueue(int num_blocks);
  void push_back(BlockId b);
  void push_front(BlockId b);
  BlockId pop_front();
  void remove(BlockId b);
  bool contains(BlockId b) const { return in_queue_[b]; }
  int size() const { return size_; }

 private:
  std::vector<BlockId> prev_, next_;
  std::vector<bool> in_queue_;
  BlockId head_ = -1, tail_ = -1;
  int size_ = 0;
};

// Owns the physical blocks. Sequences are described to it only through their
// block tables (vectors of block ids) and token ids, so it has no notion of
// requests or scheduling.
class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size, bool enable_prefix_caching);

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int num_free_blocks() const { return free_.size(); }
  int ref_count(BlockId b) const { return ref_[b]; }
  BlockHash block_hash(BlockId b) const { return hash_[b]; }
  bool prefix_caching() const { return prefix_caching_; }
  const PrefixCacheStats& prefix_stats() const { return stats_; }

  int blocks_for(int64_t num_tokens) const {
    return static_cast<int>((num_tokens + block_size_ - 1) / block_size_);
  }

  // Longest chain of cached full blocks that prefixes `tokens`, leaving at
  // least one token uncomputed. Returns the block ids (not yet referenced).
  std::vector<BlockId> find_cached_prefix(const std::vector<int32_t>& tokens, uint64_t cache_salt);
  // Takes a reference on cached blocks found by find_cached_prefix.
  void attach(std::vector<BlockId>& table, const std::vector<BlockId>& blocks);

  // Number of fresh blocks `table` needs to cover `num_tokens` tokens, plus
  // one for a copy-on-write of the block at `write_pos` when it is shared.
  int blocks_needed(const std::vector<BlockId>& table, int64_t write_pos, int64_t num_tokens) const;
  // Grows `table` to cover `num_tokens` and un-shares the block that the
  // write at `write_pos` lands in. Copies to perform are appended to `copies`.
  // The caller checks blocks_needed() against num_free_blocks() first.
  void allocate(std::vector<BlockId>& table, int64_t write_pos, int64_t num_tokens,
                std::vector<BlockCopy>& copies);

  // Registers the hash of every full block of `table` whose tokens are all
  // computed; `cursor` remembers how far this table's chain has been hashed.
  void cache_full_blocks(const std::vector<BlockId>& table, const std::vector<int32_t>& tokens,
                         int64_t num_computed, uint64_t cache_salt, HashCursor& cursor);

  // A child table sharing every block of the parent.
  std::vector<BlockId> fork(const std::vector<BlockId>& table);
  // Drops one reference on each block; tail blocks are queued for eviction
  // before head blocks.
  void free(std::vector<BlockId>& table);

  // Drops `table`'s blocks past its first `keep` (those of rejected draft
  // tokens); blocks no table holds any more are the next to be reused.
  void truncate(std::vector<BlockId>& table, int keep);

  // Throws std::logic_error if the free queue and ref counts disagree.
  void check_consistency() const;

 private:
  BlockId take_free_block();
  BlockHash hash_block(BlockHash parent, const int32_t* tokens, uint64_t salt) const;

  int num_blocks_;
  int block_size_;
  bool prefix_caching_;
  FreeBlockQueue free_;
  std::vector<int32_t> ref_;
  // Prefix cache: hash of each cached block (0 = none), its parent's hash,
  // and its token ids to rule out collisions.
  std::vector<BlockHash> hash_, parent_hash_;
  std::vector<std::vector<int32_t>> block_tokens_;
  std::unordered_map<BlockHash, BlockId> cached_;
  PrefixCacheStats stats_;
};

}  // namespace tokenmill
