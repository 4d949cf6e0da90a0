// Fused task-specific (sigmoid) batch norm on the CPU: training forward, eval forward, backward and the
// running-statistics update. Semantics: tsbn_kernels/reference.py (DESIGN.md §1).
//
// The input is viewed as [N, C, S] blocks. NCHW ("planar"): every (sample, channel) plane of S values is
// contiguous and is one block. Channels-last and 2-D inputs ("interleaved"): each spatial position holds C
// contiguous channels; a block is a chunk of rows of one sample, sized to stay in cache. Each block yields
// partial moments per channel (a shifted two-pass mean and M2, exact when |mean| >> std); partials are
// merged per (task, channel) with Chan's formula in block order, so results do not depend on the thread
// count. The apply passes fold gate, affine, mean and rstd into per-(task, channel) coefficients, and the
// relu mask of the backward pass is recomputed from x instead of being stored.
//
// Planar inputs take one of two paths with bit-identical results:
// * split: a statistics pass over all of x, then an apply pass (forward: 3 passes over memory; backward: a
//   gradient-sums pass and a dx pass, 5 passes);
// * slab: the unit is one (task, channel), i.e. the planes (n, c) of task t's samples. When a unit fits in
//   cache (kSlabBudgetBytes, TSBN_CPU_SLAB_BYTES) it is done end to end while hot: moments, merge,
//   coefficients, then the apply over the same planes (forward: 2 passes over memory; backward: 3), the
//   ideal of DESIGN.md §4. A work item is a group of adjacent channels of one task, as many as the budget
//   holds, so that each sample contributes one contiguous run of planes (short strided planes would starve
//   the hardware prefetchers). Items run in parallel; within a unit the planes are reduced in sample order
//   by the same (non-inlined) plane kernels and merges as the split path, so both paths and every thread
//   count give the same bits.
//
// This source is built three times (cpu_isa.h): here for the baseline ISA, which also registers the ops with the
// build chosen for this CPU, from ts_batch_norm_cpu_avx2.cpp for AVX2 + FMA and from ts_batch_norm_cpu_avx512.cpp
// for AVX-512. Both paths of one call always run in the same build, so the bit-identity above holds in each.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../ts_batch_norm_checks.h"
#include "../ts_batch_norm_layout.h"
#include "../ts_batch_norm_math.h"
#include "ts_batch_norm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#if defined(TSBN_CPU_AVX512)
TSBN_CPU_AVX512_BEGIN
#elif defined(TSBN_CPU_AVX2)
TSBN_CPU_AVX2_BEGIN
#endif

namespace tsbn {
namespace {

// Values of a channels-last block (whole rows of C channels): 64 KiB of fp32, so the second pass of its
// moments re-reads it from L2, while the [blocks, C] partials stay at 1/32 of x and the merge short. 4096
// values (partials 1/8 of x) measured 15-25% slower on the 2-core EPYC VM; 32768 and 65536 were no faster.
constexpr int64_t kInterleavedBlockValues = 16384;

// Largest slab work item (the bytes of x of its (task, channel) units; backward: of x and dy) done end to
// end. Half of the 1 MiB per-core L2 of the machines this was tuned on: the item's outputs (forward: y as
// large again, backward: dx half as large) are written through the same L2 while the item is re-read, and
// on an AMD L3 victim cache what falls out of L2 is still close. TSBN_CPU_SLAB_BYTES overrides it per call;
// 0 turns the slab path off.
constexpr int64_t kSlabBudgetBytes = 512 << 10;
// The slab path parallelises over work items only; below this many per thread the load imbalance would cost
// more than the saved pass, and the split path (parallel over planes) runs. Channel groups are also kept
// small enough to leave this many items per thread.
constexpr int64_t kSlabMinItemsPerThread = 4;

// The plane kernels and the merges below are shared by the split and the slab paths and kept out of line,
// so that both paths run the same machine code (same vectorised reduction order) and give the same bits.
#if defined(__GNUC__) || defined(__clang__)
#define TSBN_NOINLINE __attribute__((noinline))
#else
#define TSBN_NOINLINE
#endif

struct Blocks {
  at::Tensor x;                    // dense input (planar: contiguous; interleaved: channels-last dense)
  int64_t N = 0, C = 0, S = 0;
  bool interleaved = false;
  int64_t rows_per_block = 0;      // interleaved only
  int64_t blocks_per_sample = 0;   // planar: 1 (the planes of a sample are indexed by channel)
  std::vector<int64_t> task_of;    // task of each sample

  int64_t num_blocks() const { return N * blocks_per_sample; }
  int64_t rows_in(int64_t chunk) const {
    return interleaved ? std::min(rows_per_block, S - chunk * rows_per_block) : S;
  }
};

std::vector<int64_t> task_of_samples(const c10::optional<at::Tensor>& task_ids, int64_t N, int64_t T) {
  std::vector<int64_t> task_of(N);
  if (task_ids.has_value() && task_ids->defined()) {
    TORCH_CHECK_VALUE(task_ids->dim() == 1 && task_ids->size(0) == N, "ts_batch_norm: task_ids must have shape (",
                      N, ",), got ", task_ids->sizes());
    TORCH_CHECK_TYPE(at::isIntegralType(task_ids->scalar_type(), false), "ts_batch_norm: task_ids must be integer");
    const at::Tensor ids = task_ids->to(at::kLong).contiguous();
    const int64_t* data = ids.const_data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(data[n] >= 0 && data[n] < T, "ts_batch_norm: task_ids must lie in [0, ", T, "), got ",
                        data[n]);
      task_of[n] = data[n];
    }
  } else {
    TORCH_CHECK_VALUE(N % T == 0, "ts_batch_norm: batch size ", N, " is not divisible by num_tasks=", T);
    const int64_t per_task = N / T;
    for (int64_t n = 0; n < N; ++n) task_of[n] = n / per_task;
  }
  return task_of;
}

Blocks make_blocks(const at::Tensor& x, const c10::optional<at::Tensor>& task_ids, int64_t T) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 5, "ts_batch_norm: expected a 2D to 5D input, got ", x.dim(), "D");
  TORCH_CHECK_VALUE(T >= 1, "ts_batch_norm: num_tasks must be >= 1, got ", T);
  Blocks b;
  b.interleaved = is_interleaved(x);
  b.x = in_layout(x, b.interleaved);
  b.N = x.size(0);
  b.C = x.size(1);
  b.S = b.N && b.C ? x.numel() / (b.N * b.C) : 0;
  if (b.interleaved) {
    b.rows_per_block = std::max<int64_t>(1, kInterleavedBlockValues / std::max<int64_t>(b.C, 1));
    b.blocks_per_sample = std::max<int64_t>(1, (b.S + b.rows_per_block - 1) / b.rows_per_block);
  } else {
    b.blocks_per_sample = 1;
  }
  b.task_of = task_of_samples(task_ids, b.N, T);
  return b;
}

// The samples of each task in sample order: task t owns samples[first[t] .. first[t + 1]).
struct TaskSamples {
  std::vector<int64_t> samples, first;
  int64_t size(int64_t t) const { return first[t + 1] - first[t]; }
};

TaskSamples group_by_task(const std::vector<int64_t>& task_of, int64_t T) {
  TaskSamples ts;
  ts.first.assign(T + 1, 0);
  for (const int64_t t : task_of) ++ts.first[t + 1];
  for (int64_t t = 0; t < T; ++t) ts.first[t + 1] += ts.first[t];
  ts.samples.resize(task_of.size());
  std::vector<int64_t> next(ts.first.begin(), ts.first.end() - 1);
  for (int64_t n = 0; n < static_cast<int64_t>(task_of.size()); ++n) ts.samples[next[task_of[n]]++] = n;
  return ts;
}

// The slab budget of this call: TSBN_CPU_SLAB_BYTES when set (read on every call, so tests can force a path).
int64_t slab_budget_bytes() {
  const char* env = std::getenv("TSBN_CPU_SLAB_BYTES");
  if (env == nullptr || *env == '\0') return kSlabBudgetBytes;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && value >= 0,
                    "TSBN_CPU_SLAB_BYTES must be a non-negative integer (bytes; 0 disables the slab path), got '",
                    env, "'");
  return static_cast<int64_t>(value);
}

// The slab plan of a planar input: channels per work item (adjacent channels of one task), 0 = split path.
// `streams`: tensors of x's size read per unit (forward 1: x; backward 2: x and dy).
int64_t slab_group(const Blocks& b, const TaskSamples& ts, int64_t T, int64_t element_size, int64_t streams) {
  const int64_t budget = slab_budget_bytes();
  if (b.interleaved || budget == 0 || b.N * b.C * b.S == 0) return 0;
  int64_t largest = 0, nonempty = 0;
  for (int64_t t = 0; t < T; ++t) {
    largest = std::max(largest, ts.size(t));
    nonempty += ts.size(t) > 0;
  }
  // Quotients throughout: N_t·S·element_size·streams need not fit in int64 for absurd shapes.
  const int64_t unit_bytes_per_sample = b.S * element_size * streams;
  if (largest > budget / unit_bytes_per_sample) return 0;
  const int64_t min_items = kSlabMinItemsPerThread * static_cast<int64_t>(at::get_num_threads());
  if (nonempty * b.C < min_items) return 0;
  const int64_t by_budget = budget / unit_bytes_per_sample / largest;   // >= 1
  const int64_t by_fill = nonempty * b.C / min_items;                  // >= 1: groups per task >= C / G
  return std::max<int64_t>(1, std::min({by_budget, by_fill, b.C}));
}

// Element loads and stores in the accumulation type. bf16 converts through its raw bits (a shift, and
// round-to-nearest-even on the way back), which the simd loops vectorise; c10::BFloat16's own conversions go
// through a struct and a NaN branch that GCC leaves scalar. Results are bit-identical to c10's conversions.
template <typename acc_t, typename scalar_t>
inline acc_t load_acc(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

template <typename acc_t>
inline acc_t load_acc(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return static_cast<acc_t>(value);
}

template <typename scalar_t, typename acc_t>
inline void store_elem(scalar_t* p, int64_t i, acc_t v) {
  p[i] = static_cast<scalar_t>(v);
}

inline void store_elem(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  reinterpret_cast<uint16_t*>(p)[i] = nan ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// Per-(task, channel) parameters in the accumulation type, [T * C] each.
template <typename acc_t>
std::vector<acc_t> table(const c10::optional<at::Tensor>& t, int64_t T, int64_t C, acc_t fill, const char* name) {
  std::vector<acc_t> out(T * C, fill);
  if (t.has_value() && t->defined()) {
    check_table_shape(*t, T, C, "ts_batch_norm", name);
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "ts_batch_norm: ", name, " must be floating point");
    TORCH_CHECK_VALUE(t->device().is_cpu(), "ts_batch_norm: ", name, " must be on the CPU");
    const at::Tensor dense = t->detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy(dense.const_data_ptr<acc_t>(), dense.const_data_ptr<acc_t>() + T * C, out.begin());
  }
  return out;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t w) {
  return acc_t(1) / (acc_t(1) + std::exp(-w));
}

// The per-(task, channel) scale a: sigmoid(weight), weight, or 1 without affine.
template <typename acc_t>
std::vector<acc_t> gate_table(const c10::optional<at::Tensor>& weight, int64_t T, int64_t C, bool sigmoid_gate) {
  std::vector<acc_t> a = table<acc_t>(weight, T, C, acc_t(1), "weight");
  if (sigmoid_gate && weight.has_value() && weight->defined())
    for (auto& v : a) v = sigmoid(v);
  return a;
}

// ---- Plane kernels (one contiguous plane of S values) and merges, shared by the split and slab paths ----

// Mean and M2 of one plane: shifted by its first value, then a second pass around the mean.
template <typename scalar_t, typename acc_t>
TSBN_NOINLINE void plane_moments(const scalar_t* p, int64_t S, acc_t* mean, acc_t* m2) {
  const acc_t shift = load_acc<acc_t>(p, 0);
  acc_t s = 0;
_Pragma("omp simd reduction(+ : s)")
  for (int64_t i = 0; i < S; ++i) s += load_acc<acc_t>(p, i) - shift;
  const acc_t mu = shift + s / static_cast<acc_t>(S);
  acc_t q = 0;
_Pragma("omp simd reduction(+ : q)")
  for (int64_t i = 0; i < S; ++i) {
    const acc_t d = load_acc<acc_t>(p, i) - mu;
    q += d * d;
  }
  *mean = mu;
  *m2 = q;
}

// y = (x − mean)·scale + shift, then relu.
template <typename scalar_t, typename acc_t>
TSBN_NOINLINE void plane_apply(const scalar_t* p, scalar_t* q, int64_t S, acc_t mu, acc_t sc, acc_t sh, bool relu) {
  if (relu) {
_Pragma("omp simd")
    for (int64_t i = 0; i < S; ++i) store_elem(q, i, std::max(acc_t(0), (load_acc<acc_t>(p, i) - mu) * sc + sh));
  } else {
_Pragma("omp simd")
    for (int64_t i = 0; i < S; ++i) store_elem(q, i, (load_acc<acc_t>(p, i) - mu) * sc + sh);
  }
}

// s1 = Σ dy', s2 = Σ dy'·(x − mean) over one plane, dy' = dy masked by the relu recomputed from x.
// The relu loops here and below load dy unconditionally and select on the value: a conditional load cannot be
// if-converted without masked loads (none in SSE2), and the loop would stay scalar.
template <typename scalar_t, typename acc_t>
TSBN_NOINLINE void plane_grad_sums(const scalar_t* x, const scalar_t* dy, int64_t S, acc_t mu, acc_t sc, acc_t sh,
                                   bool relu, acc_t* s1, acc_t* s2) {
  acc_t a1 = 0, a2 = 0;
  if (relu) {
_Pragma("omp simd reduction(+ : a1, a2)")
    for (int64_t i = 0; i < S; ++i) {
      const acc_t d = load_acc<acc_t>(x, i) - mu, gv = load_acc<acc_t>(dy, i);
      const acc_t g = d * sc + sh > acc_t(0) ? gv : acc_t(0);
      a1 += g;
      a2 += g * d;
    }
  } else {
_Pragma("omp simd reduction(+ : a1, a2)")
    for (int64_t i = 0; i < S; ++i) {
      const acc_t g = load_acc<acc_t>(dy, i);
      a1 += g;
      a2 += g * (load_acc<acc_t>(x, i) - mu);
    }
  }
  *s1 = a1;
  *s2 = a2;
}

// dx over one plane.
template <typename scalar_t, typename acc_t>
TSBN_NOINLINE void plane_dx(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t S, acc_t mu,
                            DxCoefficients<acc_t> k, acc_t sc, acc_t sh, bool relu) {
  const acc_t a_ = k.dy, b_ = k.d, c_ = k.zero;
  if (relu) {
_Pragma("omp simd")
    for (int64_t i = 0; i < S; ++i) {
      const acc_t d = load_acc<acc_t>(x, i) - mu, gv = load_acc<acc_t>(dy, i);
      const acc_t g = d * sc + sh > acc_t(0) ? gv : acc_t(0);
      store_elem(dx, i, a_ * g + b_ * d + c_);
    }
  } else {
_Pragma("omp simd")
    for (int64_t i = 0; i < S; ++i) {
      const acc_t d = load_acc<acc_t>(x, i) - mu;
      store_elem(dx, i, a_ * load_acc<acc_t>(dy, i) + b_ * d + c_);
    }
  }
}

// Running (count, mean, M2) of one (task, channel), merged block by block with Chan's formula in double.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
};

TSBN_NOINLINE void chan_merge(Moments& acc, double nb, double mb, double qb) {
  const double na = acc.n, n = na + nb, delta = mb - acc.mean;
  acc.mean += delta * nb / n;
  acc.m2 += qb + delta * delta * na * nb / n;
  acc.n = n;
}

// mean, biased variance and 1/sqrt(var + eps) of merged moments (an empty task: 0, 0, 1/sqrt(eps)).
template <typename acc_t>
TSBN_NOINLINE void finish_moments(const Moments& m, double eps, acc_t* mean, acc_t* var, acc_t* invstd) {
  const double v = m.n > 0 ? m.m2 / m.n : 0.0;
  *mean = static_cast<acc_t>(m.mean);
  *var = static_cast<acc_t>(v);
  *invstd = static_cast<acc_t>(1.0 / std::sqrt(v + eps));
}

// ---- Interleaved block moments ----

// Partial moments of one block, for every channel: mean and M2 over the block's values.
template <typename scalar_t, typename acc_t>
void block_moments(const Blocks& b, const scalar_t* x, int64_t n, int64_t chunk, acc_t* mean, acc_t* m2) {
  if (!b.interleaved) {
    // Planar: `chunk` is unused; every channel's plane is its own block, done one plane at a time.
    for (int64_t c = 0; c < b.C; ++c) plane_moments<scalar_t, acc_t>(x + (n * b.C + c) * b.S, b.S, mean + c, m2 + c);
    return;
  }
  const int64_t rows = b.rows_in(chunk);
  const scalar_t* base = x + (n * b.S + chunk * b.rows_per_block) * b.C;
  const int64_t C = b.C;
  for (int64_t c = 0; c < C; ++c) mean[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = base + r * C;
_Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) mean[c] += load_acc<acc_t>(row, c) - load_acc<acc_t>(base, c);
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = load_acc<acc_t>(base, c) + mean[c] / static_cast<acc_t>(rows);
    m2[c] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = base + r * C;
_Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = load_acc<acc_t>(row, c) - mean[c];
      m2[c] += d * d;
    }
  }
}

struct Stats {
  at::Tensor mean, invstd, var, count;  // [T, C], [T, C], [T, C], [T]
};

// Statistics tensors with count filled in (the element count of every task).
template <typename acc_t>
Stats empty_stats(const Blocks& b, int64_t T) {
  const int64_t C = b.C;
  const auto opts = b.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Stats st;
  st.mean = at::zeros({T, C}, opts);
  st.var = at::zeros({T, C}, opts);
  st.invstd = at::empty({T, C}, opts);
  st.count = at::zeros({T}, opts);
  acc_t* count = st.count.data_ptr<acc_t>();
  std::vector<double> n_of_task(T, 0.0);
  for (int64_t blk = 0; blk < b.num_blocks(); ++blk)
    n_of_task[b.task_of[blk / b.blocks_per_sample]] += b.rows_in(blk % b.blocks_per_sample);
  for (int64_t t = 0; t < T; ++t) count[t] = static_cast<acc_t>(n_of_task[t]);
  return st;
}

// Split path, pass 1: the statistics of every (task, channel).
template <typename scalar_t, typename acc_t>
Stats batch_stats(const Blocks& b, int64_t T, double eps) {
  const int64_t C = b.C, B = b.num_blocks();
  const scalar_t* x = b.x.const_data_ptr<scalar_t>();
  // Partials [B, C]: one row per block (planar: per sample, one column per channel plane). Scratch that grows
  // with x comes from torch's allocator, as ATen's does: the profiler's memory events count it.
  const at::Tensor part_mean_buffer = at::empty({B, C}, b.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const at::Tensor part_m2_buffer = at::empty_like(part_mean_buffer);
  acc_t* const part_mean = part_mean_buffer.data_ptr<acc_t>();
  acc_t* const part_m2 = part_m2_buffer.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / b.blocks_per_sample, chunk = blk % b.blocks_per_sample;
      block_moments<scalar_t, acc_t>(b, x, n, chunk, part_mean + blk * C, part_m2 + blk * C);
    }
  });
  Stats st = empty_stats<acc_t>(b, T);
  acc_t* mean = st.mean.data_ptr<acc_t>();
  acc_t* var = st.var.data_ptr<acc_t>();
  acc_t* invstd = st.invstd.data_ptr<acc_t>();
  // Chan merge in block order, in double: deterministic whatever the thread count.
  if (!b.interleaved) {
    // Planar: one partial per (sample, channel), merged exactly as the slab path merges them.
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      const int64_t width = c1 - c0;
      std::vector<Moments> acc(T * width);
      for (int64_t blk = 0; blk < B; ++blk) {
        const int64_t t = b.task_of[blk];
        for (int64_t c = c0; c < c1; ++c)
          chan_merge(acc[t * width + (c - c0)], static_cast<double>(b.S), part_mean[blk * C + c],
                     part_m2[blk * C + c]);
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t k = t * C + c;
          finish_moments<acc_t>(acc[t * width + (c - c0)], eps, mean + k, var + k, invstd + k);
        }
    });
    return st;
  }
  // Interleaved: all channels of a block share its count and the task's running count, so the merge weights
  // nb/n and na·nb/n are computed once per block and the channel loop vectorises.
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<double> cnt(T, 0.0), mu(T * width, 0.0), m2(T * width, 0.0);
    for (int64_t blk = 0; blk < B; ++blk) {
      const int64_t t = b.task_of[blk / b.blocks_per_sample];
      const double nb = static_cast<double>(b.rows_in(blk % b.blocks_per_sample));
      const double na = cnt[t], n = na + nb, wb = nb / n, wab = na * wb;
      cnt[t] = n;
      const acc_t* pm = part_mean + blk * C + c0;
      const acc_t* pq = part_m2 + blk * C + c0;
      double* mu_t = mu.data() + t * width;
      double* m2_t = m2.data() + t * width;
_Pragma("omp simd")
      for (int64_t c = 0; c < width; ++c) {
        const double delta = static_cast<double>(pm[c]) - mu_t[c];
        mu_t[c] += delta * wb;
        m2_t[c] += static_cast<double>(pq[c]) + delta * delta * wab;
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k = t * C + c, j = t * width + (c - c0);
        finish_moments<acc_t>(Moments{cnt[t], mu[j], m2[j]}, eps, mean + k, var + k, invstd + k);
      }
  });
  return st;
}

// Split path, pass 2 (and eval): y = (x − mean)·scale + shift, then relu: gate, affine and rstd folded into
// scale and shift.
template <typename scalar_t, typename acc_t>
void apply_normalization(const Blocks& b, const acc_t* mean, const acc_t* scale, const acc_t* shift, bool relu,
                         scalar_t* y) {
  const scalar_t* x = b.x.const_data_ptr<scalar_t>();
  const int64_t C = b.C;
  if (!b.interleaved) {
    at::parallel_for(0, b.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t k = b.task_of[plane / C] * C + plane % C;
        plane_apply<scalar_t, acc_t>(x + plane * b.S, y + plane * b.S, b.S, mean[k], scale[k], shift[k], relu);
      }
    });
    return;
  }
  at::parallel_for(0, b.num_blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / b.blocks_per_sample, chunk = blk % b.blocks_per_sample;
      const int64_t k0 = b.task_of[n] * C;
      const acc_t *mu = mean + k0, *sc = scale + k0, *sh = shift + k0;
      const int64_t offset = (n * b.S + chunk * b.rows_per_block) * C;
      for (int64_t r = 0, rows = b.rows_in(chunk); r < rows; ++r) {
        const scalar_t* p = x + offset + r * C;
        scalar_t* q = y + offset + r * C;
        if (relu) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c)
            store_elem(q, c, std::max(acc_t(0), (load_acc<acc_t>(p, c) - mu[c]) * sc[c] + sh[c]));
        } else {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) store_elem(q, c, (load_acc<acc_t>(p, c) - mu[c]) * sc[c] + sh[c]);
        }
      }
    }
  });
}

// A slab work item: task t, channels [c0, c1). Items are numbered group-major (u = group·T + t) so that every
// thread's contiguous range of items mixes all tasks: ragged task sizes then balance across threads.
struct SlabItem {
  int64_t t, c0, c1;
};

inline SlabItem slab_item(int64_t u, int64_t T, int64_t C, int64_t group) {
  const int64_t c0 = (u / T) * group;
  return {u % T, c0, std::min(C, c0 + group)};
}

inline int64_t slab_items(int64_t T, int64_t C, int64_t group) { return T * ((C + group - 1) / group); }

// Slab path, training forward: statistics, coefficients and y of every (task, channel) unit in one visit.
// Per sample, the item's planes are one contiguous run. The apply walks the item in reverse, so the planes
// read last by the moments come first.
template <typename scalar_t, typename acc_t>
Stats slab_forward(const Blocks& b, const TaskSamples& ts, int64_t T, int64_t group, double eps, const acc_t* a,
                   const acc_t* beta, bool relu, scalar_t* y) {
  const int64_t C = b.C, S = b.S;
  const scalar_t* x = b.x.const_data_ptr<scalar_t>();
  Stats st = empty_stats<acc_t>(b, T);
  acc_t* mean = st.mean.data_ptr<acc_t>();
  acc_t* var = st.var.data_ptr<acc_t>();
  acc_t* invstd = st.invstd.data_ptr<acc_t>();
  at::parallel_for(0, slab_items(T, C, group), 1, [&](int64_t begin, int64_t end) {
    std::vector<Moments> acc(group);
    std::vector<acc_t> sc(group);
    for (int64_t u = begin; u < end; ++u) {
      const SlabItem it = slab_item(u, T, C, group);
      const int64_t* first = ts.samples.data() + ts.first[it.t];
      const int64_t count = ts.size(it.t), k0 = it.t * C;
      std::fill(acc.begin(), acc.end(), Moments{});
      for (int64_t j = 0; j < count; ++j)
        for (int64_t c = it.c0; c < it.c1; ++c) {
          acc_t pm, pq;
          plane_moments<scalar_t, acc_t>(x + (first[j] * C + c) * S, S, &pm, &pq);
          chan_merge(acc[c - it.c0], static_cast<double>(S), pm, pq);
        }
      for (int64_t c = it.c0; c < it.c1; ++c) {
        const int64_t k = k0 + c;
        finish_moments<acc_t>(acc[c - it.c0], eps, mean + k, var + k, invstd + k);
        sc[c - it.c0] = a[k] * invstd[k];
      }
      for (int64_t j = count - 1; j >= 0; --j)
        for (int64_t c = it.c1 - 1; c >= it.c0; --c) {
          const int64_t off = (first[j] * C + c) * S;
          plane_apply<scalar_t, acc_t>(x + off, y + off, S, mean[k0 + c], sc[c - it.c0], beta[k0 + c], relu);
        }
    }
  });
  return st;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "ts_batch_norm (cpu backend): input must be on the CPU, got ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "ts_batch_norm: input must be floating point, got ",
                   x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ts_bn_forward_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, double eps, bool sigmoid_gate,
    bool relu) {
  check_input(x);
  const Blocks b = make_blocks(x, task_ids, num_tasks);
  const int64_t T = num_tasks, C = b.C;
  at::Tensor y = at::empty_like(b.x);
  Stats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> rm, rv;
    if (training) {
      TORCH_CHECK_VALUE(x.numel() > 0, "ts_batch_norm: cannot normalise an empty input when training");
      std::vector<double> per_task(T, 0.0);
      for (int64_t n = 0; n < b.N; ++n) per_task[b.task_of[n]] += static_cast<double>(b.S);
      for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK_VALUE(per_task[t] != 1.0, "ts_batch_norm: expected more than 1 value per channel when training, "
                          "task ", t, " has 1");
    } else {
      TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                            running_var->defined(),
                        "ts_batch_norm: eval needs running_mean and running_var");
      rm = table<acc_t>(running_mean, T, C, acc_t(0), "running_mean");
      rv = table<acc_t>(running_var, T, C, acc_t(1), "running_var");
    }
    const std::vector<acc_t> a = gate_table<acc_t>(weight, T, C, sigmoid_gate);
    const std::vector<acc_t> beta = table<acc_t>(bias, T, C, acc_t(0), "bias");
    if (training && !b.interleaved) {
      const TaskSamples ts = group_by_task(b.task_of, T);
      if (const int64_t group = slab_group(b, ts, T, sizeof(scalar_t), 1)) {
        st = slab_forward<scalar_t, acc_t>(b, ts, T, group, eps, a.data(), beta.data(), relu,
                                           y.data_ptr<scalar_t>());
        return;
      }
    }
    if (training) {
      st = batch_stats<scalar_t, acc_t>(b, T, eps);
    } else {
      const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
      st.mean = at::from_blob(rm.data(), {T, C}, at::TensorOptions().dtype(acc_type)).clone();
      st.var = at::from_blob(rv.data(), {T, C}, at::TensorOptions().dtype(acc_type)).clone();
      st.invstd = (st.var + eps).rsqrt();
      st.count = at::zeros({T}, st.mean.options());
    }
    const acc_t* invstd = st.invstd.const_data_ptr<acc_t>();
    std::vector<acc_t> scale(T * C);
    for (int64_t k = 0; k < T * C; ++k) scale[k] = a[k] * invstd[k];
    if (b.N * C * b.S > 0)
      apply_normalization<scalar_t, acc_t>(b, st.mean.const_data_ptr<acc_t>(), scale.data(), beta.data(), relu,
                                           y.data_ptr<scalar_t>());
  });
  return {y, st.mean, st.invstd, st.var, st.count};
}

// Per block: s1 = Σ dy', s2 = Σ dy'·(x − mean), dy' = dy masked by the relu recomputed from x.
template <typename scalar_t, typename acc_t>
void block_grad_sums(const Blocks& b, const scalar_t* x, const scalar_t* dy, int64_t n, int64_t chunk,
                     const acc_t* mean, const acc_t* scale, const acc_t* shift, bool relu, acc_t* s1, acc_t* s2) {
  const int64_t C = b.C;
  const int64_t k0 = b.task_of[n] * C;
  if (!b.interleaved) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = (n * C + c) * b.S;
      plane_grad_sums<scalar_t, acc_t>(x + off, dy + off, b.S, mean[k0 + c], scale[k0 + c], shift[k0 + c], relu,
                                       s1 + c, s2 + c);
    }
    return;
  }
  const acc_t *mu = mean + k0, *sc = scale + k0, *sh = shift + k0;
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
  const int64_t offset = (n * b.S + chunk * b.rows_per_block) * C;
  for (int64_t r = 0, rows = b.rows_in(chunk); r < rows; ++r) {
    const scalar_t* xr = x + offset + r * C;
    const scalar_t* gr = dy + offset + r * C;
    if (relu) {
_Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = load_acc<acc_t>(xr, c) - mu[c], gv = load_acc<acc_t>(gr, c);
        const acc_t g = d * sc[c] + sh[c] > acc_t(0) ? gv : acc_t(0);
        s1[c] += g;
        s2[c] += g * d;
      }
    } else {
_Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = load_acc<acc_t>(xr, c) - mu[c], g = load_acc<acc_t>(gr, c);
        s1[c] += g;
        s2[c] += g * d;
      }
    }
  }
}

// The per-(task, channel) tables every backward pass reads: the saved statistics in the accumulation type, the
// gate a, the shift beta and scale = a·invstd (the relu mask is recomputed as (x − mean)·scale + beta > 0).
template <typename acc_t>
struct BackwardTables {
  at::Tensor mean_acc, invstd_acc;
  std::vector<acc_t> a, beta, scale;
  const acc_t* mean() const { return mean_acc.const_data_ptr<acc_t>(); }
  const acc_t* invstd() const { return invstd_acc.const_data_ptr<acc_t>(); }
};

template <typename acc_t>
BackwardTables<acc_t> backward_tables(const at::Tensor& mean, const at::Tensor& invstd,
                                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                      int64_t T, int64_t C, bool sigmoid_gate) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  check_table_shape(mean, T, C, "ts_batch_norm backward", "mean");
  check_table_shape(invstd, T, C, "ts_batch_norm backward", "invstd");
  BackwardTables<acc_t> tb;
  tb.mean_acc = mean.to(acc_type).contiguous();
  tb.invstd_acc = invstd.to(acc_type).contiguous();
  tb.a = gate_table<acc_t>(weight, T, C, sigmoid_gate);
  tb.beta = table<acc_t>(bias, T, C, acc_t(0), "bias");
  tb.scale.resize(T * C);
  const acc_t* r = tb.invstd();
  for (int64_t k = 0; k < T * C; ++k) tb.scale[k] = tb.a[k] * r[k];
  return tb;
}

// x's blocks and grad_y in the same layout (the backward passes walk both with one index).
std::pair<Blocks, at::Tensor> backward_blocks(const at::Tensor& grad_y, const at::Tensor& x,
                                              const c10::optional<at::Tensor>& task_ids, int64_t T) {
  check_input(x);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "ts_batch_norm backward: grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x.sizes());
  Blocks b = make_blocks(x, task_ids, T);
  at::Tensor dy = in_layout(grad_y.to(x.scalar_type()), b.interleaved);
  return {std::move(b), std::move(dy)};
}

// Split path, backward pass 1: s1 = Σ dy', s2 = Σ dy'·(x − mean) per (task, channel) in double, block partials
// summed in block order (deterministic whatever the thread count).
template <typename scalar_t, typename acc_t>
void split_grad_sums(const Blocks& b, const scalar_t* xp, const scalar_t* gp, const BackwardTables<acc_t>& tb,
                     bool relu, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = b.C, B = b.num_blocks();
  const at::Tensor part_s1_buffer = at::empty({B, C}, b.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const at::Tensor part_s2_buffer = at::empty_like(part_s1_buffer);
  acc_t* const part_s1 = part_s1_buffer.data_ptr<acc_t>();
  acc_t* const part_s2 = part_s2_buffer.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      block_grad_sums<scalar_t, acc_t>(b, xp, gp, blk / b.blocks_per_sample, blk % b.blocks_per_sample, tb.mean(),
                                       tb.scale.data(), tb.beta.data(), relu, part_s1 + blk * C,
                                       part_s2 + blk * C);
  });
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t blk = 0; blk < B; ++blk) {
      const int64_t t = b.task_of[blk / b.blocks_per_sample];
      for (int64_t c = c0; c < c1; ++c) {
        s1[t * C + c] += part_s1[blk * C + c];
        s2[t * C + c] += part_s2[blk * C + c];
      }
    }
  });
}

// Split path, backward pass 2: dx from the per-(task, channel) coefficients of dx_coefficients.
template <typename scalar_t, typename acc_t>
void split_dx(const Blocks& b, const scalar_t* xp, const scalar_t* gp, scalar_t* dxp, const BackwardTables<acc_t>& tb,
              const std::vector<DxCoefficients<acc_t>>& coef, bool relu) {
  const int64_t C = b.C, T = static_cast<int64_t>(coef.size()) / std::max<int64_t>(C, 1);
  const acc_t* mean = tb.mean();
  const acc_t* sc = tb.scale.data();
  const acc_t* sh = tb.beta.data();
  if (!b.interleaved) {
    at::parallel_for(0, b.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t k = b.task_of[plane / C] * C + plane % C;
        const int64_t off = plane * b.S;
        plane_dx<scalar_t, acc_t>(xp + off, gp + off, dxp + off, b.S, mean[k], coef[k], sc[k], sh[k], relu);
      }
    });
    return;
  }
  // Channel-contiguous coefficient arrays: the loop over channels vectorises (an array of DxCoefficients would not).
  std::vector<acc_t> A(T * C), Bk(T * C), Kk(T * C);
  for (int64_t k = 0; k < T * C; ++k) {
    A[k] = coef[k].dy;
    Bk[k] = coef[k].d;
    Kk[k] = coef[k].zero;
  }
  at::parallel_for(0, b.num_blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / b.blocks_per_sample, chunk = blk % b.blocks_per_sample;
      const int64_t k0 = b.task_of[n] * C;
      const int64_t offset = (n * b.S + chunk * b.rows_per_block) * C;
      const acc_t *a_ = A.data() + k0, *b_ = Bk.data() + k0, *c_ = Kk.data() + k0;
      const acc_t *mu = mean + k0, *s_ = sc + k0, *h_ = sh + k0;
      for (int64_t r = 0, rows = b.rows_in(chunk); r < rows; ++r) {
        const int64_t o = offset + r * C;
        if (relu) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = load_acc<acc_t>(xp, o + c) - mu[c], gv = load_acc<acc_t>(gp, o + c);
            const acc_t g = d * s_[c] + h_[c] > acc_t(0) ? gv : acc_t(0);
            store_elem(dxp, o + c, a_[c] * g + b_[c] * d + c_[c]);
          }
        } else {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = load_acc<acc_t>(xp, o + c) - mu[c];
            store_elem(dxp, o + c, a_[c] * load_acc<acc_t>(gp, o + c) + b_[c] * d + c_[c]);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ts_bn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_t, const at::Tensor& invstd_t,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, bool sigmoid_gate, bool relu) {
  const std::pair<Blocks, at::Tensor> blocks = backward_blocks(grad_y, x, task_ids, num_tasks);
  const Blocks& b = blocks.first;  // (not a structured binding: lambdas may not capture those before C++20)
  const at::Tensor& dy = blocks.second;
  const int64_t T = num_tasks, C = b.C;
  at::Tensor dx = at::empty_like(b.x);
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const BackwardTables<acc_t> tb = backward_tables<acc_t>(mean_t, invstd_t, weight, bias, T, C, sigmoid_gate);
    const acc_t* mean = tb.mean();
    const acc_t* invstd = tb.invstd();
    const std::vector<acc_t>& a = tb.a;
    const scalar_t* xp = b.x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const acc_t* sh = tb.beta.data();
    const acc_t* sc = tb.scale.data();

    // Sums per (task, channel) in double, over the task's planes / blocks in sample order: deterministic.
    std::vector<double> s1(T * C, 0.0), s2(T * C, 0.0), m(T, 0.0);
    for (int64_t n = 0; n < b.N; ++n) m[b.task_of[n]] += static_cast<double>(b.S);

    const TaskSamples ts = group_by_task(b.task_of, T);
    if (const int64_t group = slab_group(b, ts, T, sizeof(scalar_t), 2)) {
      // Slab path: sums, coefficients and dx of every (task, channel) unit in one visit.
      const int64_t S = b.S;
      at::parallel_for(0, slab_items(T, C, group), 1, [&](int64_t begin, int64_t end) {
        std::vector<DxCoefficients<acc_t>> coef(group);
        for (int64_t u = begin; u < end; ++u) {
          const SlabItem it = slab_item(u, T, C, group);
          const int64_t* first = ts.samples.data() + ts.first[it.t];
          const int64_t count = ts.size(it.t), k0 = it.t * C;
          // s1, s2 of this item's units are written by this item only (they start at 0).
          for (int64_t j = 0; j < count; ++j)
            for (int64_t c = it.c0; c < it.c1; ++c) {
              const int64_t k = k0 + c, off = (first[j] * C + c) * S;
              acc_t p1, p2;
              plane_grad_sums<scalar_t, acc_t>(xp + off, gp + off, S, mean[k], sc[k], sh[k], relu, &p1, &p2);
              s1[k] += p1;
              s2[k] += p2;
            }
          for (int64_t c = it.c0; c < it.c1; ++c) {
            const int64_t k = k0 + c;
            coef[c - it.c0] = dx_coefficients<acc_t>(a.data(), invstd, k, s1[k], s2[k], m[it.t], training);
          }
          for (int64_t j = count - 1; j >= 0; --j)
            for (int64_t c = it.c1 - 1; c >= it.c0; --c) {
              const int64_t k = k0 + c, off = (first[j] * C + c) * S;
              plane_dx<scalar_t, acc_t>(xp + off, gp + off, dxp + off, S, mean[k], coef[c - it.c0], sc[k], sh[k],
                                        relu);
            }
        }
      });
    } else {
      split_grad_sums<scalar_t, acc_t>(b, xp, gp, tb, relu, s1, s2);
      std::vector<DxCoefficients<acc_t>> coef(T * C);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = t * C + c;
          coef[k] = dx_coefficients<acc_t>(a.data(), invstd, k, s1[k], s2[k], m[t], training);
        }
      split_dx<scalar_t, acc_t>(b, xp, gp, dxp, tb, coef, relu);
    }

    if (weight.has_value() && weight->defined()) {
      std::vector<acc_t> w = table<acc_t>(weight, T, C, acc_t(0), "weight");
      at::Tensor dw = at::empty({T, C}, x.options().dtype(acc_type));
      acc_t* dwp = dw.data_ptr<acc_t>();
      for (int64_t k = 0; k < T * C; ++k) {
        const double s2x = static_cast<double>(invstd[k]) * s2[k];
        const double sg = sigmoid_gate ? static_cast<double>(sigmoid(w[k])) : 1.0;
        dwp[k] = static_cast<acc_t>(sigmoid_gate ? s2x * sg * (1.0 - sg) : s2x);
      }
      dweight = dw.to(weight->scalar_type());
    } else {
      dweight = at::empty({0}, x.options());
    }
    if (bias.has_value() && bias->defined()) {
      // copy=true: s1 is a local buffer, and .to() of a double tensor to double would otherwise alias it.
      dbias = at::from_blob(s1.data(), {T, C}, at::TensorOptions().dtype(at::kDouble))
                  .to(bias->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    } else {
      dbias = at::empty({0}, x.options());
    }
  });
  return {dx, dweight, dbias};
}

// ---- The passes of the cross-process path (tsbn_kernels/sync_batch_norm.py), between its collectives ----

// This process's (mean, biased var, element count) per (task, channel): the split path's statistics pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ts_bn_batch_stats_cpu(const at::Tensor& x,
                                                                      const c10::optional<at::Tensor>& task_ids,
                                                                      int64_t num_tasks) {
  check_input(x);
  const Blocks b = make_blocks(x, task_ids, num_tasks);
  Stats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_batch_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    st = batch_stats<scalar_t, acc_t>(b, num_tasks, /*eps (invstd is not returned)=*/1.0);
  });
  return {st.mean, st.var, st.count};
}

// This process's s1 = Σ dy', s2 = Σ dy'·(x − mean) per (task, channel), in float64.
std::tuple<at::Tensor, at::Tensor> ts_bn_backward_reduce_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool sigmoid_gate, bool relu) {
  const std::pair<Blocks, at::Tensor> blocks = backward_blocks(grad_y, x, task_ids, num_tasks);
  const Blocks& b = blocks.first;
  const at::Tensor& dy = blocks.second;
  const int64_t T = num_tasks, C = b.C;
  const auto opts = x.options().dtype(at::kDouble);
  at::Tensor sum_dy = at::zeros({T, C}, opts), sum_dy_xmu = at::zeros({T, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardTables<acc_t> tb = backward_tables<acc_t>(mean, invstd, weight, bias, T, C, sigmoid_gate);
    std::vector<double> s1(T * C, 0.0), s2(T * C, 0.0);
    split_grad_sums<scalar_t, acc_t>(b, b.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), tb, relu,
                                     s1, s2);
    std::copy(s1.begin(), s1.end(), sum_dy.data_ptr<double>());
    std::copy(s2.begin(), s2.end(), sum_dy_xmu.data_ptr<double>());
  });
  return {sum_dy, sum_dy_xmu};
}

// dx of the training backward from sums and counts given from outside (every process's): the split dx pass.
at::Tensor ts_bn_backward_elemt_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
                                    const at::Tensor& sum_dy_xmu, const at::Tensor& count,
                                    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool sigmoid_gate,
                                    bool relu) {
  const std::pair<Blocks, at::Tensor> blocks = backward_blocks(grad_y, x, task_ids, num_tasks);
  const Blocks& b = blocks.first;
  const at::Tensor& dy = blocks.second;
  const int64_t T = num_tasks, C = b.C;
  check_table_shape(sum_dy, T, C, "ts_batch_norm backward", "sum_dy");
  check_table_shape(sum_dy_xmu, T, C, "ts_batch_norm backward", "sum_dy_xmu");
  check_count_shape(count, T, "ts_batch_norm backward");
  const at::Tensor s1 = sum_dy.to(at::kDouble).contiguous(), s2 = sum_dy_xmu.to(at::kDouble).contiguous();
  const at::Tensor m = count.to(at::kDouble).contiguous();
  at::Tensor dx = at::empty_like(b.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardTables<acc_t> tb = backward_tables<acc_t>(mean, invstd, weight, bias, T, C, sigmoid_gate);
    const double *p1 = s1.const_data_ptr<double>(), *p2 = s2.const_data_ptr<double>();
    const double* pm = m.const_data_ptr<double>();
    std::vector<DxCoefficients<acc_t>> coef(T * C);
    for (int64_t k = 0; k < T * C; ++k)
      coef[k] = dx_coefficients<acc_t>(tb.a.data(), tb.invstd(), k, p1[k], p2[k], pm[k / C], /*training=*/true);
    if (b.N * C * b.S > 0)
      split_dx<scalar_t, acc_t>(b, b.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                dx.data_ptr<scalar_t>(), tb, coef, relu);
  });
  return dx;
}

// Which path ts_bn_forward (backward=false) or ts_bn_backward would take for this input in training, under
// the current TSBN_CPU_SLAB_BYTES and thread count: "slab:G" (G channels per work item), "split" or
// "interleaved". For tests and tuning.
std::string ts_bn_cpu_path(const at::Tensor& x, const c10::optional<at::Tensor>& task_ids, int64_t num_tasks,
                           bool backward) {
  check_input(x);
  const Blocks b = make_blocks(x, task_ids, num_tasks);
  if (b.interleaved) return "interleaved";
  const TaskSamples ts = group_by_task(b.task_of, num_tasks);
  const int64_t group = slab_group(b, ts, num_tasks, x.element_size(), backward ? 2 : 1);
  return group ? "slab:" + std::to_string(group) : std::string("split");
}

}  // namespace

#if defined(TSBN_CPU_AVX2) || defined(TSBN_CPU_AVX512)
#ifdef TSBN_CPU_AVX512
extern const CpuBatchNormKernels kAvx512CpuKernels = {
#else
extern const CpuBatchNormKernels kAvx2CpuKernels = {
#endif
    &ts_bn_forward_cpu,     &ts_bn_backward_cpu,        &ts_bn_cpu_path,
    &ts_bn_batch_stats_cpu, &ts_bn_backward_reduce_cpu, &ts_bn_backward_elemt_cpu};
}  // namespace tsbn
TSBN_CPU_ISA_END
#else
extern const CpuBatchNormKernels kBaselineCpuKernels = {&ts_bn_forward_cpu,         &ts_bn_backward_cpu,
                                                        &ts_bn_cpu_path,            &ts_bn_batch_stats_cpu,
                                                        &ts_bn_backward_reduce_cpu, &ts_bn_backward_elemt_cpu};

TORCH_LIBRARY_FRAGMENT(tsbn, m) {
  m.def("ts_bn_cpu_path(Tensor x, Tensor? task_ids, int num_tasks, bool backward) -> str",
        TSBN_CPU_KERNELS_FOR_THIS_CPU(kBaselineCpuKernels, kAvx2CpuKernels, kAvx512CpuKernels).path);
}

TORCH_LIBRARY_IMPL(tsbn, CPU, m) {
  const CpuBatchNormKernels& kernels =
      TSBN_CPU_KERNELS_FOR_THIS_CPU(kBaselineCpuKernels, kAvx2CpuKernels, kAvx512CpuKernels);
  m.impl("ts_bn_forward", kernels.forward);
  m.impl("ts_bn_backward", kernels.backward);
  m.impl("ts_bn_batch_stats", kernels.batch_stats);
  m.impl("ts_bn_backward_reduce", kernels.backward_reduce);
  m.impl("ts_bn_backward_elemt", kernels.backward_elemt);
}

}  // namespace tsbn
#endif
