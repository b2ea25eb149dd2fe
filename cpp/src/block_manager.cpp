#include "tokenmill/block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace tokenmill {

FreeBlockQueue::FreeBlockQueue(int num_blocks)
    : prev_(num_blocks, -1), next_(num_blocks, -1), in_queue_(num_blocks) {}

void FreeBlockQueue::push_back(BlockId b) {
  prev_[b] = tail_;
  next_[b] = -1;
  if (tail_ >= 0)
    next_[tail_] = b;
  else
    head_ = b;
  tail_ = b;
  in_queue_[b] = true;
  ++size_;
}

void FreeBlockQueue::push_front(BlockId b) {
  if (head_ < 0) return push_back(b);
  next_[b] = head_;
  prev_[b] = -1;
  prev_[head_] = b;
  head_ = b;
  in_queue_[b] = true;
  ++size_;
}

BlockId FreeBlockQueue::pop_front() {
  BlockId b = head_;
  remove(b);
  return b;
}

void FreeBlockQueue::remove(BlockId b) {
  if (prev_[b] >= 0)
    next_[prev_[b]] = next_[b];
  else
    head_ = next_[b];
  if (next_[b] >= 0)
    prev_[next_[b]] = prev_[b];
  else
    tail_ = prev_[b];
  prev_[b] = next_[b] = -1;
  in_queue_[b] = false;
  --size_;
}

BlockManager::BlockManager(int num_blocks, int block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      prefix_caching_(enable_prefix_caching),
      free_(num_blocks),
      ref_(num_blocks, 0),
      hash_(num_blocks, 0),
      parent_hash_(num_blocks, 0),
      block_tokens_(num_blocks) {
  if (num_blocks <= 0 || block_size <= 0)
    throw std::invalid_argument("num_blocks and block_size must be positive");
  for (BlockId b = 0; b < num_blocks; ++b) free_.push_back(b);
}

BlockHash BlockManager::hash_block(BlockHash parent, const int32_t* tokens, uint64_t salt) const {
  // splitmix64-style mixing; collisions are ruled out by comparing tokens.
  auto mix = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  uint64_t h = mix(parent ^ mix(salt));
  for (int i = 0; i < block_size_; ++i) h = mix(h ^ static_cast<uint32_t>(tokens[i]));
  return h ? h : 1;  // 0 marks "no hash"
}

BlockId BlockManager::take_free_block() {
  if (free_.size() == 0) throw std::logic_error("no free KV block");
  BlockId b = free_.pop_front();
  if (hash_[b]) {  // evict its cached content
    cached_.erase(hash_[b]);
    hash_[b] = 0;
    block_tokens_[b].clear();
  }
  ref_[b] = 1;
  return b;
}

std::vector<BlockId> BlockManager::find_cached_prefix(const std::vector<int32_t>& tokens,
                                                      uint64_t cache_salt) {
  std::vector<BlockId> found;
  if (!prefix_caching_ || tokens.empty()) return found;
  const int64_t max_blocks = (static_cast<int64_t>(tokens.size()) - 1) / block_size_;
  BlockHash parent = 0;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int32_t* t = tokens.data() + i * block_size_;
    BlockHash h = hash_block(parent, t, cache_salt);
    ++stats_.queries;
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    BlockId b = it->second;
    if (parent_hash_[b] != parent || !std::equal(t, t + block_size_, block_tokens_[b].begin()))
      break;
    ++stats_.hits;
    found.push_back(b);
    parent = h;
  }
  return found;
}

void BlockManager::attach(std::vector<BlockId>& table, const std::vector<BlockId>& blocks) {
  for (BlockId b : blocks) {
    if (ref_[b]++ == 0) free_.remove(b);
    table.push_back(b);
  }
}

int BlockManager::blocks_needed(const std::vector<BlockId>& table, int64_t write_pos,
                                int64_t num_tokens) const {
  int needed = blocks_for(num_tokens) - static_cast<int>(table.size());
  if (needed < 0) needed = 0;
  int64_t idx = write_pos / block_size_;
  if (idx < static_cast<int64_t>(table.size()) && ref_[table[idx]] > 1) ++needed;
  return needed;
}

void BlockManager::allocate(std::vector<BlockId>& table, int64_t write_pos, int64_t num_tokens,
                            std::vector<BlockCopy>& copies) {
  int64_t idx = write_pos / block_size_;
  if (idx < static_cast<int64_t>(table.size()) && ref_[table[idx]] > 1) {
    BlockId src = table[idx];
    BlockId dst = take_free_block();
    --ref_[src];
    table[idx] = dst;
    copies.push_back({src, dst});
  }
  const int target = blocks_for(num_tokens);
  while (static_cast<int>(table.size()) < target) table.push_back(take_free_block());
}

void BlockManager::cache_full_blocks(const std::vector<BlockId>& table,
                                     const std::vector<int32_t>& tokens, int64_t num_computed,
                                     uint64_t cache_salt, HashCursor& cursor) {
  if (!prefix_caching_) return;
  const int64_t full = num_computed / block_size_;
  for (int64_t i = cursor.num_blocks; i < full; ++i) {
    BlockId b = table[i];
    const int32_t* t = tokens.data() + i * block_size_;
    BlockHash h = hash_block(cursor.last, t, cache_salt);
    // A block whose content is already cached elsewhere stays unhashed; the
    // chain goes on so that later blocks still match.
    if (hash_[b] == 0 && cached_.emplace(h, b).second) {
      hash_[b] = h;
      parent_hash_[b] = cursor.last;
      block_tokens_[b].assign(t, t + block_size_);
    }
    cursor.last = h;
    cursor.num_blocks = static_cast<int>(i + 1);
  }
}

std::vector<BlockId> BlockManager::fork(const std::vector<BlockId>& table) {
  for (BlockId b : table) ++ref_[b];
  return table;
}

void BlockManager::free(std::vector<BlockId>& table) {
  for (auto it = table.rbegin(); it != table.rend(); ++it)
    if (--ref_[*it] == 0) free_.push_back(*it);
  table.clear();
}

void BlockManager::truncate(std::vector<BlockId>& table, int keep) {
  while (static_cast<int>(table.size()) > keep) {
    const BlockId b = table.back();
    table.pop_back();
    // Nothing in it is worth keeping: reused before any cached block.
    if (--ref_[b] == 0) hash_[b] ? free_.push_back(b) : free_.push_front(b);
  }
}

void BlockManager::check_consistency() const {
  int free_count = 0;
  for (BlockId b = 0; b < num_blocks_; ++b) {
    if (ref_[b] < 0) throw std::logic_error("negative ref count on block " + std::to_string(b));
    if (free_.contains(b) != (ref_[b] == 0))
      throw std::logic_error("block " + std::to_string(b) +
                             " free-queue membership disagrees with ref count");
    free_count += free_.contains(b);
    if (hash_[b]) {
      auto it = cached_.find(hash_[b]);
      if (it == cached_.end() || it->second != b)
        throw std::logic_error("prefix-cache index out of sync");
    }
  }
  if (free_count != free_.size()) throw std::logic_error("free queue size mismatch");
}

}  // namespace tokenmill
