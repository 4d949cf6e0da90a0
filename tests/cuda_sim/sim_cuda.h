// A host mock of the few CUDA built-ins csrc/cuda/ts_batch_norm_kernels.cuh uses, so that the kernels run
// on a machine without a GPU. Every CUDA thread of a block is a fiber on one host thread (started with
// makecontext/swapcontext, switched with _setjmp/_longjmp, which skip the signal-mask system calls; build
// with -U_FORTIFY_SOURCE so that longjmp is not the checking variant); blocks run one after another.
// __syncthreads() waits for every thread of the block, the warp intrinsics exchange values through a
// per-warp buffer between two waits for all 32 lanes of the warp. A collective that not all
// lanes of the warp (or threads of the block) reach is reported as a deadlock and aborts the run.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

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
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  jmp_buf scheduler_env;
  int current = -1;
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
    for (Fiber& g : b.fibers)
      if (g.waiting == kind) g.waiting = -1;
  }
  if (_setjmp(f.env) == 0) _longjmp(b.scheduler_env, 1);
}

// Runs body() as `threads` threads of each of `grid` blocks.
template <typename F>
void launch(int grid, int threads, F&& body) {
  Block& b = block();
  if (static_cast<int>(b.fibers.size()) < threads) b.fibers.resize(threads);
  b.threads = threads;
  b.warp_arrived.assign(threads / 32, 0);
  b.exchange.assign(threads, 0);
  b.body = body;
  for (int blk = 0; blk < grid; ++blk) {
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
    for (;;) {
      bool ran = false, all_done = true;
      for (int t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        if (f.done) continue;
        all_done = false;
        if (f.waiting != -1) continue;
        ran = true;
        b.current = t;
        threadIdx.x = t;
        if (_setjmp(b.scheduler_env) == 0) {
          if (f.started) _longjmp(f.env, 1);
          f.started = true;
          swapcontext(&b.scheduler, &f.ctx);
        }
      }
      if (all_done) break;
      if (!ran) {
        std::fprintf(stderr, "sim: deadlock in block %d: a barrier or warp collective is not reached by all\n", blk);
        std::abort();
      }
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
