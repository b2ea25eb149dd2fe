// Structured outputs' token masks applied to logits: bit t of a row's 32-bit
// words allows token t; every other token's logit becomes -inf. Words with
// every bit set (inside a JSON string, most of them) are skipped whole.
#include <cstring>
#include <limits>

#include "common.h"
#include "tokenmill/kernels.h"

namespace tokenmill::cpu {

void apply_token_bitmask(float* logits, int64_t stride, const int32_t* bitmask, int64_t words,
                         const int64_t* rows, int64_t count, int64_t vocab) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  for_thread_ranges(count, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* row = logits + rows[c] * stride;
      const int32_t* mask = bitmask + rows[c] * words;
      for (int64_t w = 0; w < words && 32 * w < vocab; ++w) {
        const auto bits = static_cast<uint32_t>(mask[w]);
        if (bits == 0xffffffffu) continue;
        const int64_t t0 = 32 * w, t1 = t0 + 32 < vocab ? t0 + 32 : vocab;
        for (int64_t t = t0; t < t1; ++t)
          if (!((bits >> (t - t0)) & 1u)) row[t] = kMasked;
      }
    }
  });
}

}  // namespace tokenmill::cpu
