// Drives the scheduler from C++ alone: three requests share a small KV
// cache, one of them with a prompt long enough to be chunked.
#include <cstdio>
#include <numeric>
#include <vector>

#include "tokenmill/scheduler.h"

int main() {
  tokenmill::SchedulerConfig config;
  config.num_blocks = 64;
  config.block_size = 16;
  config.max_num_batched_tokens = 128;
  config.max_model_len = 512;
  tokenmill::Scheduler scheduler(config);

  for (int r = 0; r < 3; ++r) {
    std::vector<int32_t> prompt(50 + 100 * r);
    std::iota(prompt.begin(), prompt.end(), 1);
    tokenmill::RequestParams params;
    params.max_tokens = 8;
    scheduler.add_request(r, prompt, params);
  }
  int steps = 0;
  while (scheduler.has_unfinished()) {
    auto out = scheduler.schedule();
    int samples = 0;
    for (int k : out->num_samples) samples += k;
    std::vector<int32_t> sampled(samples, 42);  // a stand-in for the model
    auto result = scheduler.update(*out, sampled.data(), samples);
    std::printf("step %2d: %d seqs, %3d tokens, %zu finished, %d free blocks\n", ++steps,
                out->num_seqs(), out->num_tokens(), result.of(tokenmill::EventKind::kFinished).size(),
                scheduler.stats().num_free_blocks);
  }
  scheduler.check_invariants();
  return 0;
}
