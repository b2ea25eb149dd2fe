// Fibers for the host emulation of the CUDA execution model (runtime.h).
#include "runtime.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace tokenmill::gpu::emulation {

const Position* current = nullptr;

namespace {

constexpr size_t kStackBytes = 128 * 1024;

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer
// in *from, and resumes the stack `to` the same way: a switch without the
// signal-mask system call that swapcontext makes.
extern "C" void tm_emulation_switch(void** from, void* to);
asm(R"(
  .text
  .globl tm_emulation_switch
  .type tm_emulation_switch, @function
tm_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tm_emulation_switch, .-tm_emulation_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

struct Context {
  void* sp = nullptr;
};

void start(Context& c, char* stack, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top - 16);  // entry sees the alignment a call gives
  slot[1] = nullptr;
  slot[0] = reinterpret_cast<void*>(entry);
  for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;  // the six registers popped first
  c.sp = slot - 6;
}

void jump(Context& from, Context& to) { tm_emulation_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void start(Context& c, char* stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void jump(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Barrier {
  int members = 0, arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  Context context;
  Position position;
  bool done = false;
};

struct Block {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Context host;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;
  int running = 0, live = 0, stalled = 0;
};

Block* block = nullptr;

void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
  block->stalled = 0;
}

void leave(Barrier& b) {
  --b.members;
  if (b.arrived > 0 && b.arrived == b.members) release(b);
}

// Hands over to the next fiber that has not ended, or to the launching
// thread when none is left.
void pass_on() {
  Block& b = *block;
  Fiber& from = b.fibers[b.running];
  if (b.live == 0) {
    jump(from.context, b.host);
    return;
  }
  const int n = static_cast<int>(b.fibers.size());
  int next = b.running;
  do next = (next + 1) % n;
  while (b.fibers[next].done);
  if (next == b.running) return;
  if (++b.stalled > 2 * n) {  // every fiber resumed twice and none moved on
    std::fprintf(stderr,
                 "tokenmill GPU emulation: threads of block (%u, %u, %u) wait at "
                 "different barriers (a barrier in divergent code)\n",
                 from.position.block.x, from.position.block.y, from.position.block.z);
    std::abort();
  }
  b.running = next;
  current = &b.fibers[next].position;
  jump(from.context, b.fibers[next].context);
}

void wait(Barrier& b) {
  const unsigned generation = b.generation;
  block->stalled = 0;
  if (++b.arrived == b.members) {
    release(b);
    return;
  }
  while (b.generation == generation) pass_on();
}

void fiber_main() {
  Block& b = *block;
  (*b.body)();
  Fiber& f = b.fibers[b.running];
  f.done = true;
  --b.live;
  b.stalled = 0;
  leave(b.all);
  leave(b.warps[thread_rank(f.position) / kWarpSize]);
  pass_on();
  std::abort();  // an ended fiber is never resumed
}

}  // namespace

void sync_block() { wait(block->all); }

void sync_warp() { wait(block->warps[thread_rank(*current) / kWarpSize]); }

uint64_t exchange(uint64_t value, int src) {
  Block& b = *block;
  const int me = thread_rank(*current), warp = me / kWarpSize;
  b.lanes[me] = value;
  wait(b.warps[warp]);
  const int from = warp * kWarpSize + src;
  const uint64_t got = from < static_cast<int>(b.lanes.size()) ? b.lanes[from] : value;
  wait(b.warps[warp]);  // nobody overwrites a lane before every reader has it
  return got;
}

void run(dim3 grid, dim3 block_dim, const std::function<void()>& thread_body) {
  static std::mutex one_launch_at_a_time;  // __shared__ statics and `block`
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (threads <= 0 || threads > 1024 || grid.x * grid.y * grid.z == 0) return;
  Block b;
  b.body = &thread_body;
  b.fibers.resize(threads);
  b.lanes.resize(threads);
  for (int t = 0; t < threads; ++t) b.stacks.emplace_back(new char[kStackBytes]);
  block = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.all = Barrier{threads};
        b.warps.assign((threads + kWarpSize - 1) / kWarpSize, Barrier{});
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.done = false;
          f.position.thread =
              dim3(t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y));
          f.position.block = dim3(bx, by, bz);
          f.position.block_dim = block_dim;
          f.position.grid_dim = grid;
          ++b.warps[t / kWarpSize].members;
          start(f.context, b.stacks[t].get(), fiber_main);
        }
        b.live = threads;
        b.running = 0;
        b.stalled = 0;
        current = &b.fibers[0].position;
        jump(b.host, b.fibers[0].context);
      }
  block = nullptr;
  current = nullptr;
}

}  // namespace tokenmill::gpu::emulation
