// A host mock of the few CUDA built-ins csrc/cuda/ts_batch_norm_kernels.cuh uses, so that the kernels run
// on a machine without a GPU. Every CUDA thread of a block is a fiber on one host thread (started with
// makecontext/swapcontext, switched with _setjmp/_longjmp, which skip the signal-mask system calls; build
// with -U_FORTIFY_SOURCE so that longjmp is not the checking variant); blocks run one after another.
// __syncthreads() waits for every thread of the block, the warp intrinsics exchange values through a
// per-warp buffer between two waits for all 32 lanes of the warp. A collective that not all
// lanes of the warp (or threads of the block) reach is reported as a deadlock and aborts the run.
// The scheduler picks the next runnable fiber round robin (every thread advances to its next wait in turn, so
// the warps stay within a collective or two of each other), or always the lowest- or highest-numbered runnable
// one (sim::schedule()): one warp then runs ahead as far as the barriers let it, which exposes missing barriers
// between a shared-memory write and other warps' reads of the old value.
// Dynamic shared memory (the kernels' dynamic_smem()) is one buffer of the launch's size, filled with 0xff bytes
// (NaN in every float type) before each block and followed by a guard checked after each block.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory: one static instance per kernel instantiation, used by one block at a time.
#define __shared__ static

struct dim3 {
  unsigned x = 0, y = 1, z = 1;
};

// Set by the scheduler before it resumes a fiber: only one runs at a time.
inline dim3 threadIdx, blockIdx, gridDim, blockDim;

namespace sim {

constexpr size_t kStack = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  jmp_buf env;
  std::vector<char> stack = std::vector<char>(kStack);
  bool started = false;
  bool done = false;
  int waiting = -1;  // -1 runnable, 0 block barrier, 1 + w warp w's barrier
};

struct Block {
  int threads = 0;
  std::vector<unsigned char> smem;  // dynamic shared memory, then kGuard guard bytes
  unsigned char* smem_base = nullptr;
  size_t smem_bytes = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  jmp_buf scheduler_env;
  int current = -1;
  int done = 0;                  // fibers finished
  int low = 0, high = -1;        // lowest / highest fiber made runnable since the scheduler last looked
  int block_arrived = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned long long> exchange;
  std::function<void()> body;
};

inline Block& block() {
  static Block b;
  return b;
}

inline void fiber_main() {
  Block& b = block();
  b.body();
  b.fibers[b.current].done = true;
  ++b.done;
  _longjmp(b.scheduler_env, 1);
}

// Waits until every participant of barrier `kind` (0: block, 1 + w: warp w) has arrived.
inline void wait(int kind) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  int& arrived = kind == 0 ? b.block_arrived : b.warp_arrived[kind - 1];
  const int need = kind == 0 ? b.threads : 32;
  f.waiting = kind;
  if (++arrived == need) {
    arrived = 0;
    const int first = kind == 0 ? 0 : 32 * (kind - 1), last = kind == 0 ? b.threads : first + 32;
    for (int t = first; t < last; ++t)
      if (b.fibers[t].waiting == kind) b.fibers[t].waiting = -1;
    b.low = std::min(b.low, first);
    b.high = std::max(b.high, last - 1);
  }
  if (_setjmp(f.env) == 0) _longjmp(b.scheduler_env, 1);
}

enum class Schedule { kRoundRobin, kLowestFirst, kHighestFirst };

inline Schedule& schedule() {
  static Schedule s = Schedule::kRoundRobin;
  return s;
}

constexpr size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xa5;

inline unsigned char* dynamic_shared() { return block().smem_base; }

// Runs body() as `threads` threads of each of `grid` blocks (or of the blocks listed in `only`, in that
// order), with `smem_bytes` of dynamic shared memory.
template <typename F>
void launch(int grid, int threads, F&& body, size_t smem_bytes = 0, const std::vector<int>* only = nullptr) {
  Block& b = block();
  if (threads % 32 != 0 || threads < 32 || threads > 1024) {
    std::fprintf(stderr, "sim: invalid block size %d\n", threads);
    std::abort();
  }
  b.smem.assign(smem_bytes + kGuard + 16, 0);
  b.smem_base = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(b.smem.data()) + 15) &
                                                 ~std::uintptr_t(15));
  b.smem_bytes = smem_bytes;
  if (static_cast<int>(b.fibers.size()) < threads) b.fibers.resize(threads);
  b.threads = threads;
  b.warp_arrived.assign(threads / 32, 0);
  b.exchange.assign(threads, 0);
  b.body = body;
  const int count = only != nullptr ? static_cast<int>(only->size()) : grid;
  for (int index = 0; index < count; ++index) {
    const int blk = only != nullptr ? (*only)[index] : index;
    std::memset(b.smem_base, 0xff, smem_bytes);
    std::memset(b.smem_base + smem_bytes, kGuardByte, kGuard);
    b.block_arrived = 0;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      f.started = false;
      f.done = false;
      f.waiting = -1;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &b.scheduler;
      makecontext(&f.ctx, fiber_main, 0);
    }
    blockIdx.x = blk;
    gridDim.x = grid;
    blockDim.x = threads;
    const Schedule policy = schedule();
    b.done = 0;
    b.low = threads;
    b.high = -1;
    // Round robin: where the next scan starts; lowest / highest first: the last pick.
    int next = policy == Schedule::kHighestFirst ? threads - 1 : 0;
    for (;;) {
      if (b.done == threads) break;
      // Lowest first: every fiber below the last pick was blocked then, so only those released since (b.low)
      // can be runnable below it; the same upwards for highest first.
      int pick = -1;
      if (policy == Schedule::kRoundRobin) {
        for (int i = 0; i < threads && pick < 0; ++i) {
          const int t = (next + i) % threads;
          if (!b.fibers[t].done && b.fibers[t].waiting == -1) pick = t;
        }
      } else if (policy == Schedule::kLowestFirst) {
        for (int t = std::min(next, b.low); t < threads && pick < 0; ++t)
          if (!b.fibers[t].done && b.fibers[t].waiting == -1) pick = t;
      } else {
        for (int t = std::max(next, b.high); t >= 0 && pick < 0; --t)
          if (!b.fibers[t].done && b.fibers[t].waiting == -1) pick = t;
      }
      b.low = threads;
      b.high = -1;
      if (pick < 0) {
        std::fprintf(stderr, "sim: deadlock in block %d: a barrier or warp collective is not reached by all\n", blk);
        std::abort();
      }
      next = policy == Schedule::kRoundRobin ? pick + 1 : pick;
      Fiber& f = b.fibers[pick];
      b.current = pick;
      threadIdx.x = pick;
      if (_setjmp(b.scheduler_env) == 0) {
        if (f.started) _longjmp(f.env, 1);
        f.started = true;
        swapcontext(&b.scheduler, &f.ctx);
      }
    }
    for (size_t i = 0; i < kGuard; ++i)
      if (b.smem_base[smem_bytes + i] != kGuardByte) {
        std::fprintf(stderr, "sim: block %d wrote past its %zu bytes of dynamic shared memory\n", blk, smem_bytes);
        std::abort();
      }
  }
}

template <typename T>
T warp_exchange(T v, int source_lane) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "exchange slot too small");
  Block& b = block();
  const int tid = static_cast<int>(threadIdx.x), base = tid & ~31, warp = tid >> 5;
  unsigned long long slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  b.exchange[tid] = slot;
  wait(1 + warp);
  const unsigned long long got = b.exchange[base + source_lane];
  wait(1 + warp);
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

}  // namespace sim

inline void __syncthreads() { sim::wait(0); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  if (mask != 0xffffffffu) std::abort();
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return sim::warp_exchange(v, lane + delta < 32 ? lane + delta : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return sim::warp_exchange(v, (lane ^ lane_mask) & 31);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int source_lane) {
  if (mask != 0xffffffffu) std::abort();
  return sim::warp_exchange(v, source_lane & 31);
}

inline unsigned __ballot_sync(unsigned mask, bool predicate) {
  if (mask != 0xffffffffu) std::abort();
  sim::Block& b = sim::block();
  const int tid = static_cast<int>(threadIdx.x), base = tid & ~31, warp = tid >> 5;
  b.exchange[tid] = predicate ? 1 : 0;
  sim::wait(1 + warp);
  unsigned votes = 0;
  for (int l = 0; l < 32; ++l) votes |= (b.exchange[base + l] ? 1u : 0u) << l;
  sim::wait(1 + warp);
  return votes;
}

inline int __ffs(int x) { return __builtin_ffs(x); }

inline int min(int a, int b) { return a < b ? a : b; }

// The kernels' dynamic shared memory (see dynamic_smem() in ts_batch_norm_kernels.cuh).
#define TSBN_DYNAMIC_SMEM() ::sim::dynamic_shared()
