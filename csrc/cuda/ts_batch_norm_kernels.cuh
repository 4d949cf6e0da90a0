// Device code of the fused task-specific batch norm (ts_batch_norm_cuda.cu holds the host side). Kept in a
// header of plain CUDA C++ (no ATen) so that the index and partition logic can also be compiled for the
// host against a mock of the CUDA built-ins and executed thread by thread on a machine without a GPU
// (tests/cuda_sim/).
//
// Layout. The input is seen as [N, C, S]: "planar" (NCHW, and 3-D [N, C, L]: every (n, c) plane of S values
// is contiguous) or "interleaved" (channels-last and 2-D [N, C]: every position holds C contiguous
// channels, so the tensor is N·S rows of C values). Loads and stores move packs of VEC elements (16 bytes
// when the pointers are 16-byte aligned and S (planar) or C (interleaved) is a multiple of VEC; smaller
// packs down to one element otherwise).
//
// Work decomposition (make_plan). The work is cut into units of (a block of NB samples, a chunk j of the
// positions of a sample, a block of channels); either NB == 1 and a sample's positions are split into J
// chunks, or J == 1 and a unit spans NB whole samples. There are about 8 units per SM; a grid of as many
// blocks as are resident loops over them (grid stride), so the grid fills the GPU whatever T·C is.
//   planar:      `lanes` threads (1..32, a power of two) share one (sample, channel) plane, a block covers
//                kThreads / lanes channels; L counts packs.
//   interleaved: `lanes` threads cover `lanes` packs of a row (channels), kThreads / lanes threads are
//                rows; L counts rows.
// Within a unit, samples are visited in order and cut into segments of consecutive samples of one task.
// The statistics passes write one partial row per segment, at slot (first sample of the segment) · J + j;
// the count array part_count[N · J] holds the elements per channel of each slot's segment and 0 for slots
// that start no segment. The merge kernels combine, per (task, 32 channels), the slots of that task.
//
// Numerics. A thread keeps, per channel, the count, mean and M2 of what it has seen, shifted by a pivot
// (the segment's first value of that channel, shared by every thread of the channel): each tile of up to
// U packs is reduced in two passes in registers and merged with Chan's formula, then threads are merged
// with Chan's formula over shuffles and shared memory in a fixed order. A partial row holds the mean in
// double (pivot + shifted mean: an fp32 mean of |mean| >> std would round away ~1e-3 std) and M2 in the
// accumulation type, and the merge kernels combine the partial rows with Chan's formula in double. Sums are
// in the accumulation type (fp32 for fp16/bf16, double for double), in an order fixed by the shapes and
// the SM count alone: no atomics, two runs are bitwise equal. The backward sums (Σdy, Σdy·(x − mean))
// follow the same path as plain sums.
//
// Traversal order. The statistics passes visit units in increasing memory order (grid stride), the apply
// passes in decreasing order, so the units the statistics pass read last (still in L2) are applied first.
//
// The slab kernels at the end of this file are the other path for planar inputs of the replicated batch:
// one block per (task, channel) with the whole unit in shared memory, 2 passes over memory forward and 3
// backward instead of 3 and 5 (the host picks the path: ts_batch_norm_cuda.cu, slab_config).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../ts_batch_norm_math.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace tsbn {
namespace bn_kernels {

// Threads per block of every pass kernel. The pass kernels carry no __launch_bounds__: with it (and no
// minimum block count), ptxas of CUDA 13 picks register budgets of 48-80 for some instantiations and
// spills a few outer-loop values; without it, none spills (all fit 255 registers at 256 threads anyway).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMergeThreads = 512;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr int kMergeBatch = 8;  // partial rows a merge warp loads before it combines them
constexpr unsigned kFullMask = 0xffffffffu;
// Elements per channel in one unit: per-thread counts in fp32 stay exact integers (< 2^24).
constexpr int64_t kMaxUnitElements = int64_t(1) << 22;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Packs per thread per tile, reading one input (forward) or two (backward): about 64 bytes of input in
// flight per thread and tile.
template <typename scalar_t, int VEC, int inputs>
constexpr int tile_depth() {
  constexpr int one = VEC * sizeof(scalar_t) >= 16 ? 4 : (VEC * sizeof(scalar_t) >= 8 ? 8 : 16);
  return inputs == 1 ? one : (one / 2 > 2 ? one / 2 : 2);
}

struct Plan {
  int N = 0, C = 0;
  int64_t S = 0;
  int64_t SV = 0;        // planar: packs per plane, S / VEC
  int CV = 0;            // interleaved: packs per row, C / VEC
  int lanes = 1;         // planar: threads per plane; interleaved: threads across a row
  int lanes_log2 = 0;
  int CB = 1;            // channel blocks (planar: kThreads / lanes channels; interleaved: lanes packs)
  int NB = 1;            // samples per unit
  int SB = 1;            // sample blocks, ceil(N / NB)
  int J = 1;             // chunks per sample (J > 1 only when NB == 1)
  int L = 1;             // chunk length: planar in packs, interleaved in rows
  int units = 0;         // SB · J · CB
  int slots = 0;         // partial rows, N · J
  const int32_t* task_of = nullptr;  // task of each sample; nullptr: sample n is in task n / per_task
  int per_task = 1;
  bool fits = false;     // every count above fits the 32-bit fields (checked by the host before launching)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int floor_pow2(int64_t v) {
  int p = 1;
  while (2 * static_cast<int64_t>(p) <= v) p *= 2;
  return p;
}

inline int ceil_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

inline int log2_of(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

// The decomposition of an [N, C, S] input (N, C, S >= 1) for packs of `vec` elements and tiles `depth`
// packs deep, aiming at `units_target` units.
inline Plan make_plan(int64_t N, int64_t C, int64_t S, bool interleaved, int vec, int depth,
                      int64_t units_target, const int32_t* task_of, int64_t per_task) {
  constexpr int64_t kIntMax = 0x7fffffff;
  Plan p;
  p.S = S;
  p.task_of = task_of;
  int64_t extent, tile, target, lanes, CB;
  if (!interleaved) {
    p.SV = S / vec;
    // Enough lanes per plane for about one tile, more when there are too few channels to fill a block.
    lanes = floor_pow2(std::min<int64_t>(32, std::max<int64_t>(1, ceil_div(p.SV, depth))));
    while (lanes < 32 && C * lanes < kThreads) lanes *= 2;
    CB = ceil_div(C, kThreads / lanes);
    extent = p.SV;
    tile = lanes * depth;
    target = std::min(std::max(ceil_div(N * p.SV * CB, units_target), tile),
                      std::max(tile, kMaxUnitElements / vec));
  } else {
    const int64_t CV = C / vec;
    lanes = ceil_pow2(std::min<int64_t>(CV, 32));
    CB = ceil_div(CV, lanes);
    extent = S;
    tile = (kThreads / lanes) * depth;
    target = std::min(std::max(ceil_div(N * S * CB, units_target), tile), std::max(tile, kMaxUnitElements));
    // Packs between the rows of a tile are 32-bit offsets.
    p.fits = CV * (kThreads / lanes) * depth <= kIntMax;
    p.CV = static_cast<int>(std::min(CV, kIntMax));
  }
  int64_t NB, J, L;
  if (extent >= target) {
    NB = 1;
    J = ceil_div(extent, target);
    L = ceil_div(ceil_div(extent, J), tile) * tile;
    J = ceil_div(extent, L);
  } else {
    J = 1;
    L = extent;
    NB = std::min<int64_t>(std::max<int64_t>(target / extent, 1), N);
  }
  const int64_t SB = ceil_div(N, NB), units = SB * J * CB, slots = N * J;
  // Samples below 2^30 so that the 32-sample votes of task_run_end cannot overflow.
  p.fits = (interleaved ? p.fits : true) && N <= (kIntMax >> 1) && C <= kIntMax && units <= kIntMax &&
           slots <= kIntMax && L <= kIntMax && per_task <= kIntMax;
  p.N = static_cast<int>(std::min(N, kIntMax));
  p.C = static_cast<int>(std::min(C, kIntMax));
  p.lanes = static_cast<int>(lanes);
  p.lanes_log2 = log2_of(p.lanes);
  p.CB = static_cast<int>(std::min(CB, kIntMax));
  p.NB = static_cast<int>(std::min(NB, kIntMax));
  p.SB = static_cast<int>(std::min(SB, kIntMax));
  p.J = static_cast<int>(std::min(J, kIntMax));
  p.L = static_cast<int>(std::min(L, kIntMax));
  p.units = static_cast<int>(std::min(units, kIntMax));
  p.slots = static_cast<int>(std::min(slots, kIntMax));
  p.per_task = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, per_task), kIntMax));
  return p;
}

struct Unit {
  int n0, n1, j, cb;  // samples [n0, n1), chunk j, channel block cb
};

// Planar units in memory order: sample block, then channel block, then chunk.
__device__ __forceinline__ Unit planar_unit(const Plan& p, int u) {
  Unit un;
  un.j = u % p.J;
  const int rest = u / p.J;
  un.cb = rest % p.CB;
  un.n0 = (rest / p.CB) * p.NB;
  un.n1 = un.n0 + min(p.NB, p.N - un.n0);
  return un;
}

// Interleaved units in memory order: sample block, then chunk, then channel group.
__device__ __forceinline__ Unit interleaved_unit(const Plan& p, int u) {
  Unit un;
  un.cb = u % p.CB;
  const int rest = u / p.CB;
  un.j = rest % p.J;
  un.n0 = (rest / p.J) * p.NB;
  un.n1 = un.n0 + min(p.NB, p.N - un.n0);
  return un;
}

__device__ __forceinline__ int task_at(const Plan& p, int n) {
  return p.task_of != nullptr ? p.task_of[n] : n / p.per_task;
}

// The first sample m in (n, n1) whose task is not t, or n1. Every lane of the warp must call it with the
// same arguments (it votes over 32 samples at a time).
__device__ __forceinline__ int task_run_end(const Plan& p, int n, int n1, int t) {
  if (p.task_of == nullptr) return static_cast<int>(min64(n1, (static_cast<int64_t>(t) + 1) * p.per_task));
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int m = n + 1; m < n1; m += 32) {
    const bool other = lane < n1 - m && p.task_of[m + lane] != t;
    const unsigned mask = __ballot_sync(kFullMask, other);
    if (mask != 0u) return m + (__ffs(static_cast<int>(mask)) - 1);
  }
  return n1;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t index) {
  return reinterpret_cast<const Pack<T, V>*>(base)[index];
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t index, const Pack<T, V>& value) {
  reinterpret_cast<Pack<T, V>*>(base)[index] = value;
}

// The U packs a thread keeps in flight: pack k is base[first + k·stride] (in packs) when k·spacing < limit,
// marked in ok[k]; every load is issued before any value is used.
template <int U, int V, typename T>
__device__ __forceinline__ void load_batch(Pack<T, V> (&pk)[U], bool (&ok)[U], const T* base, int64_t first,
                                           int64_t stride, int spacing, int limit) {
#pragma unroll
  for (int k = 0; k < U; ++k) {
    ok[k] = k * spacing < limit;
    if (ok[k]) pk[k] = load_pack<V>(base, first + k * stride);
  }
}

// d·s + b as one fused multiply-add: the forward's y and the backward's relu mask round identically.
__device__ __forceinline__ float affine(float d, float s, float b) { return fmaf(d, s, b); }
__device__ __forceinline__ double affine(double d, double s, double b) { return fma(d, s, b); }

template <typename T>
__device__ __forceinline__ T relu_if(T v, bool relu) {
  return relu && !(v > T(0)) ? T(0) : v;
}

// Chan's merge of (nb, mb, qb) into (n, mean, m2): counts, means and sums of squared deviations.
template <typename T>
__device__ __forceinline__ void chan_merge(T& n, T& mean, T& m2, T nb, T mb, T qb) {
  if (nb > T(0)) {
    const T total = n + nb;
    const T f = nb / total;
    const T delta = mb - mean;
    mean += delta * f;
    m2 += qb + delta * delta * (n * f);
    n = total;
  }
}

// The same for V channels seen the same number of times.
template <typename T, int V>
__device__ __forceinline__ void chan_merge_vec(T& n, T (&mean)[V], T (&m2)[V], T nb, const T (&mb)[V],
                                               const T (&qb)[V]) {
  if (nb > T(0)) {
    const T total = n + nb;
    const T f = nb / total;
    const T g = n * f;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const T delta = mb[e] - mean[e];
      mean[e] += delta * f;
      m2[e] += qb[e] + delta * delta * g;
    }
    n = total;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Statistics: partial (mean, M2) per segment and channel, and the count of every slot.

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    moments_planar_kernel(const scalar_t* __restrict__ x, const Plan p, double* __restrict__ part_mean,
                          acc_t* __restrict__ part_m2, int64_t* __restrict__ part_count) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lanes = p.lanes, li = tid & (lanes - 1);
  const int group = tid >> p.lanes_log2, per_block = kThreads >> p.lanes_log2;
  const int step = lanes * U;
  for (int it = static_cast<int>(blockIdx.x); it < p.units; it += static_cast<int>(gridDim.x)) {
    const Unit un = planar_unit(p, it);
    const int c = un.cb * per_block + group;
    const bool cvalid = c < p.C;
    const int64_t pa = static_cast<int64_t>(un.j) * p.L;
    const int len = static_cast<int>(min64(p.L, p.SV - pa));  // packs of the chunk
    acc_t pivot = 0, cnt = 0, mean = 0, m2 = 0;
    int seg = un.n0;
    int t_seg = task_at(p, un.n0);
    // Ends the segment [seg, seg_end): merges the `lanes` threads of each plane, writes the partial row.
    const auto flush = [&](int seg_end) {
      for (int off = lanes >> 1; off > 0; off >>= 1) {
        const acc_t nb = __shfl_down_sync(kFullMask, cnt, off);
        const acc_t mb = __shfl_down_sync(kFullMask, mean, off);
        const acc_t qb = __shfl_down_sync(kFullMask, m2, off);
        chan_merge(cnt, mean, m2, nb, mb, qb);
      }
      const int slot = seg * p.J + un.j;
      if (li == 0 && cvalid) {
        part_mean[static_cast<int64_t>(slot) * p.C + c] = static_cast<double>(pivot) + static_cast<double>(mean);
        part_m2[static_cast<int64_t>(slot) * p.C + c] = m2;
      }
      if (un.cb == 0)
        for (int m = seg + tid; m < seg_end; m += kThreads)
          part_count[m * p.J + un.j] = m == seg ? static_cast<int64_t>(seg_end - seg) * len * VEC : 0;
      cnt = mean = m2 = acc_t(0);
    };
    for (int n = un.n0; n < un.n1; ++n) {
      const int t = task_at(p, n);
      if (t != t_seg) {
        flush(n);
        seg = n;
        t_seg = t;
      }
      if (!cvalid) continue;
      const scalar_t* src = x + ((static_cast<int64_t>(n) * p.C + c) * p.SV + pa) * VEC;  // chunk of plane (n, c)
      if (n == seg) pivot = static_cast<acc_t>(src[0]);
      for (int q0 = li; q0 < len; q0 += step) {
        Pack<scalar_t, VEC> pk[U];
        bool ok[U];
        load_batch(pk, ok, src, q0, lanes, lanes, len - q0);
        acc_t sum = 0;
        int valid = 0;
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (!ok[k]) continue;
          ++valid;
#pragma unroll
          for (int e = 0; e < VEC; ++e) sum += static_cast<acc_t>(pk[k].v[e]) - pivot;
        }
        const acc_t nb = static_cast<acc_t>(valid * VEC);
        const acc_t mb = sum / nb;
        acc_t qb = 0;
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (!ok[k]) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t d = (static_cast<acc_t>(pk[k].v[e]) - pivot) - mb;
            qb += d * d;
          }
        }
        chan_merge(cnt, mean, m2, nb, mb, qb);
      }
    }
    flush(un.n1);
  }
}

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    moments_interleaved_kernel(const scalar_t* __restrict__ x, const Plan p, double* __restrict__ part_mean,
                               acc_t* __restrict__ part_m2, int64_t* __restrict__ part_count) {
  __shared__ acc_t sh_mean[kWarps][32 * VEC];
  __shared__ acc_t sh_m2[kWarps][32 * VEC];
  __shared__ acc_t sh_pivot[32 * VEC];
  __shared__ acc_t sh_cnt[kWarps];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int bx = p.lanes, tx = tid & (bx - 1), ty = tid >> p.lanes_log2;
  const int by = kThreads >> p.lanes_log2;
  const int row_step = by * U;
  const int rstride = by * p.CV;  // packs between a thread's rows of a tile
  for (int it = static_cast<int>(blockIdx.x); it < p.units; it += static_cast<int>(gridDim.x)) {
    const Unit un = interleaved_unit(p, it);
    const int cv = un.cb * bx + tx;
    const bool cvalid = cv < p.CV;
    // Rows [ra, rb) of samples [na, ne), all of one task: one partial row at slot na · J + j.
    const auto segment = [&](int64_t ra, int64_t rb, int na, int ne) {
      acc_t pivot[VEC], mean[VEC], m2[VEC], cnt = 0;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pivot[e] = mean[e] = m2[e] = acc_t(0);
      if (cvalid) {
        const Pack<scalar_t, VEC> first = load_pack<VEC>(x, ra * p.CV + cv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) pivot[e] = static_cast<acc_t>(first.v[e]);
        for (int64_t r0 = ra + ty; r0 < rb; r0 += row_step) {
          const int left = static_cast<int>(min64(rb - r0, row_step));  // k · by < left: row k is in range
          const scalar_t* src = x + (r0 * p.CV + cv) * VEC;
          Pack<scalar_t, VEC> pk[U];
          bool ok[U];
          load_batch(pk, ok, src, 0, rstride, by, left);
          int valid = 0;
#pragma unroll
          for (int k = 0; k < U; ++k) valid += ok[k];
          const acc_t nb = static_cast<acc_t>(valid);
          acc_t mb[VEC], qb[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc_t sum = 0;
#pragma unroll
            for (int k = 0; k < U; ++k)
              if (ok[k]) sum += static_cast<acc_t>(pk[k].v[e]) - pivot[e];
            mb[e] = sum / nb;
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc_t q = 0;
#pragma unroll
            for (int k = 0; k < U; ++k) {
              if (!ok[k]) continue;
              const acc_t d = (static_cast<acc_t>(pk[k].v[e]) - pivot[e]) - mb[e];
              q += d * d;
            }
            qb[e] = q;
          }
          chan_merge_vec(cnt, mean, m2, nb, mb, qb);
        }
      }
      // Lanes l and l + off (off a multiple of bx) hold the same channels: merge down to lanes < bx.
      for (int off = 16; off >= bx; off >>= 1) {
        const acc_t nb = __shfl_down_sync(kFullMask, cnt, off);
        acc_t mb[VEC], qb[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          mb[e] = __shfl_down_sync(kFullMask, mean[e], off);
          qb[e] = __shfl_down_sync(kFullMask, m2[e], off);
        }
        chan_merge_vec(cnt, mean, m2, nb, mb, qb);
      }
      if (lane < bx) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          sh_mean[warp][lane * VEC + e] = mean[e];
          sh_m2[warp][lane * VEC + e] = m2[e];
          if (warp == 0) sh_pivot[lane * VEC + e] = pivot[e];
        }
        if (lane == 0) sh_cnt[warp] = cnt;  // lane 0 holds channel pack 0 of the group, which always exists
      }
      __syncthreads();
      if (tid < bx * VEC) {
        acc_t n = 0, mu = 0, q = 0;
        for (int w = 0; w < kWarps; ++w) chan_merge(n, mu, q, sh_cnt[w], sh_mean[w][tid], sh_m2[w][tid]);
        const int c = un.cb * bx * VEC + tid;
        if (c < p.C) {
          const int64_t row = static_cast<int64_t>(na * p.J + un.j) * p.C;
          part_mean[row + c] = static_cast<double>(sh_pivot[tid]) + static_cast<double>(mu);
          part_m2[row + c] = q;
        }
      }
      if (un.cb == 0)
        for (int m = na + tid; m < ne; m += kThreads) part_count[m * p.J + un.j] = m == na ? rb - ra : 0;
      __syncthreads();
    };
    if (p.J > 1) {
      const int64_t r0 = static_cast<int64_t>(un.n0) * p.S;
      segment(r0 + static_cast<int64_t>(un.j) * p.L, r0 + min64(static_cast<int64_t>(un.j + 1) * p.L, p.S), un.n0,
              un.n0 + 1);
    } else {
      for (int n = un.n0; n < un.n1;) {
        const int ne = task_run_end(p, n, un.n1, task_at(p, n));
        segment(static_cast<int64_t>(n) * p.S, static_cast<int64_t>(ne) * p.S, n, ne);
        n = ne;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The elementwise passes: every element out of x (and dy) through per-(task, channel) coefficients, units in
// reverse order (the last unit a statistics pass read is the first one here, still in L2). One skeleton per
// layout; an Op holds the coefficient tables, what it reads per (task, channel) and what it makes of an element.

// y = (x − mean)·scale + shift (+ relu).
template <typename acc_t>
struct ApplyOp {
  static constexpr int kInputs = 1;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;  // nullptr: 0
  bool relu;
  struct Coef {
    acc_t mu, sc, sh;
  };
  __device__ __forceinline__ Coef at(int64_t k) const {
    return {mean[k], scale[k], shift != nullptr ? shift[k] : acc_t(0)};
  }
  __device__ __forceinline__ acc_t operator()(const Coef& c, acc_t x, acc_t) const {
    return relu_if(affine(x - c.mu, c.sc, c.sh), relu);
  }
};

// dx = coef_dy·dy' + coef_d·(x − mean) + coef_0, dy' = dy masked by the relu recomputed from x.
template <typename acc_t>
struct GradInputOp {
  static constexpr int kInputs = 2;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;  // nullptr: 0
  const acc_t* __restrict__ coef_dy;
  const acc_t* __restrict__ coef_d;
  const acc_t* __restrict__ coef_0;
  bool relu;
  struct Coef {
    acc_t mu, sc, sh, a, b, z;
  };
  __device__ __forceinline__ Coef at(int64_t k) const {
    return {mean[k], scale[k], shift != nullptr ? shift[k] : acc_t(0), coef_dy[k], coef_d[k], coef_0[k]};
  }
  __device__ __forceinline__ acc_t operator()(const Coef& c, acc_t x, acc_t dy) const {
    const acc_t d = x - c.mu;
    const acc_t g = relu && !(affine(d, c.sc, c.sh) > acc_t(0)) ? acc_t(0) : dy;
    return c.a * g + c.b * d + c.z;
  }
};

template <typename scalar_t, typename acc_t, int VEC, int U, typename Op>
__device__ __forceinline__ void elementwise_planar(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                                   scalar_t* __restrict__ out, const Plan& p, const Op& op) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lanes = p.lanes, li = tid & (lanes - 1);
  const int group = tid >> p.lanes_log2, per_block = kThreads >> p.lanes_log2;
  const int step = lanes * U;
  for (int it = static_cast<int>(blockIdx.x); it < p.units; it += static_cast<int>(gridDim.x)) {
    const Unit un = planar_unit(p, p.units - 1 - it);
    const int c = un.cb * per_block + group;
    if (c >= p.C) continue;
    const int64_t pa = static_cast<int64_t>(un.j) * p.L;
    const int len = static_cast<int>(min64(p.L, p.SV - pa));
    for (int n = un.n0; n < un.n1; ++n) {
      const typename Op::Coef coef = op.at(static_cast<int64_t>(task_at(p, n)) * p.C + c);
      const int64_t base = ((static_cast<int64_t>(n) * p.C + c) * p.SV + pa) * VEC;
      for (int q0 = li; q0 < len; q0 += step) {
        Pack<scalar_t, VEC> px[U], pg[U];
        bool ok[U];
        load_batch(px, ok, x + base, q0, lanes, lanes, len - q0);
        if constexpr (Op::kInputs == 2) load_batch(pg, ok, dy + base, q0, lanes, lanes, len - q0);
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (!ok[k]) continue;
          Pack<scalar_t, VEC> result;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc_t g = acc_t(0);
            if constexpr (Op::kInputs == 2) g = static_cast<acc_t>(pg[k].v[e]);
            result.v[e] = static_cast<scalar_t>(op(coef, static_cast<acc_t>(px[k].v[e]), g));
          }
          store_pack<VEC>(out + base, q0 + k * lanes, result);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, int U, typename Op>
__device__ __forceinline__ void elementwise_interleaved(const scalar_t* __restrict__ x,
                                                        const scalar_t* __restrict__ dy, scalar_t* __restrict__ out,
                                                        const Plan& p, const Op& op) {
  const int tid = static_cast<int>(threadIdx.x);
  const int bx = p.lanes, tx = tid & (bx - 1), ty = tid >> p.lanes_log2;
  const int by = kThreads >> p.lanes_log2;
  const int row_step = by * U;
  const int rstride = by * p.CV;
  for (int it = static_cast<int>(blockIdx.x); it < p.units; it += static_cast<int>(gridDim.x)) {
    const Unit un = interleaved_unit(p, p.units - 1 - it);
    const int cv = un.cb * bx + tx;
    const bool cvalid = cv < p.CV;
    const auto segment = [&](int64_t ra, int64_t rb, int t) {
      if (!cvalid) return;
      typename Op::Coef coef[VEC];
      const int64_t k0 = static_cast<int64_t>(t) * p.C + cv * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) coef[e] = op.at(k0 + e);
      for (int64_t r0 = ra + ty; r0 < rb; r0 += row_step) {
        const int left = static_cast<int>(min64(rb - r0, row_step));
        const int64_t offset = (r0 * p.CV + cv) * VEC;
        Pack<scalar_t, VEC> px[U], pg[U];
        bool ok[U];
        load_batch(px, ok, x + offset, 0, rstride, by, left);
        if constexpr (Op::kInputs == 2) load_batch(pg, ok, dy + offset, 0, rstride, by, left);
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (!ok[k]) continue;
          Pack<scalar_t, VEC> result;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc_t g = acc_t(0);
            if constexpr (Op::kInputs == 2) g = static_cast<acc_t>(pg[k].v[e]);
            result.v[e] = static_cast<scalar_t>(op(coef[e], static_cast<acc_t>(px[k].v[e]), g));
          }
          store_pack<VEC>(out + offset, k * rstride, result);
        }
      }
    };
    if (p.J > 1) {
      const int64_t r0 = static_cast<int64_t>(un.n0) * p.S;
      segment(r0 + static_cast<int64_t>(un.j) * p.L, r0 + min64(static_cast<int64_t>(un.j + 1) * p.L, p.S),
              task_at(p, un.n0));
    } else {
      for (int n = un.n0; n < un.n1;) {
        const int t = task_at(p, n);
        const int ne = task_run_end(p, n, un.n1, t);
        segment(static_cast<int64_t>(n) * p.S, static_cast<int64_t>(ne) * p.S, t);
        n = ne;
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    apply_planar_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Plan p,
                        const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                        const acc_t* __restrict__ shift, bool relu) {
  elementwise_planar<scalar_t, acc_t, VEC, U>(x, nullptr, y, p, ApplyOp<acc_t>{mean, scale, shift, relu});
}

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    apply_interleaved_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Plan p,
                             const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                             const acc_t* __restrict__ shift, bool relu) {
  elementwise_interleaved<scalar_t, acc_t, VEC, U>(x, nullptr, y, p, ApplyOp<acc_t>{mean, scale, shift, relu});
}

// ---------------------------------------------------------------------------------------------------------
// Backward sums per segment and channel: Σdy', Σdy'·(x − mean), dy' = dy masked by the relu recomputed from x.

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    grad_sums_planar_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const Plan p,
                            const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                            const acc_t* __restrict__ shift, bool relu, acc_t* __restrict__ part_s1,
                            acc_t* __restrict__ part_s2, int64_t* __restrict__ part_count) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lanes = p.lanes, li = tid & (lanes - 1);
  const int group = tid >> p.lanes_log2, per_block = kThreads >> p.lanes_log2;
  const int step = lanes * U;
  for (int it = static_cast<int>(blockIdx.x); it < p.units; it += static_cast<int>(gridDim.x)) {
    const Unit un = planar_unit(p, it);
    const int c = un.cb * per_block + group;
    const bool cvalid = c < p.C;
    const int64_t pa = static_cast<int64_t>(un.j) * p.L;
    const int len = static_cast<int>(min64(p.L, p.SV - pa));
    acc_t s1 = 0, s2 = 0;
    int seg = un.n0;
    int t_seg = task_at(p, un.n0);
    const auto flush = [&](int seg_end) {
      for (int off = lanes >> 1; off > 0; off >>= 1) {
        s1 += __shfl_down_sync(kFullMask, s1, off);
        s2 += __shfl_down_sync(kFullMask, s2, off);
      }
      const int slot = seg * p.J + un.j;
      if (li == 0 && cvalid) {
        part_s1[static_cast<int64_t>(slot) * p.C + c] = s1;
        part_s2[static_cast<int64_t>(slot) * p.C + c] = s2;
      }
      if (un.cb == 0)
        for (int m = seg + tid; m < seg_end; m += kThreads)
          part_count[m * p.J + un.j] = m == seg ? static_cast<int64_t>(seg_end - seg) * len * VEC : 0;
      s1 = s2 = acc_t(0);
    };
    for (int n = un.n0; n < un.n1; ++n) {
      const int t = task_at(p, n);
      if (t != t_seg) {
        flush(n);
        seg = n;
        t_seg = t;
      }
      if (!cvalid) continue;
      const int64_t k0 = static_cast<int64_t>(t) * p.C + c;
      const acc_t mu = mean[k0], sc = scale[k0], sh = shift != nullptr ? shift[k0] : acc_t(0);
      const int64_t base = ((static_cast<int64_t>(n) * p.C + c) * p.SV + pa) * VEC;
      for (int q0 = li; q0 < len; q0 += step) {
        Pack<scalar_t, VEC> px[U], pg[U];
        bool ok[U];
        load_batch(px, ok, x + base, q0, lanes, lanes, len - q0);
        load_batch(pg, ok, dy + base, q0, lanes, lanes, len - q0);
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (!ok[k]) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t d = static_cast<acc_t>(px[k].v[e]) - mu;
            const acc_t g = relu && !(affine(d, sc, sh) > acc_t(0)) ? acc_t(0) : static_cast<acc_t>(pg[k].v[e]);
            s1 += g;
            s2 += g * d;
          }
        }
      }
    }
    flush(un.n1);
  }
}

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    grad_sums_interleaved_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const Plan p,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                 const acc_t* __restrict__ shift, bool relu, acc_t* __restrict__ part_s1,
                                 acc_t* __restrict__ part_s2, int64_t* __restrict__ part_count) {
  __shared__ acc_t sh_s1[kWarps][32 * VEC];
  __shared__ acc_t sh_s2[kWarps][32 * VEC];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int bx = p.lanes, tx = tid & (bx - 1), ty = tid >> p.lanes_log2;
  const int by = kThreads >> p.lanes_log2;
  const int row_step = by * U;
  const int rstride = by * p.CV;
  for (int it = static_cast<int>(blockIdx.x); it < p.units; it += static_cast<int>(gridDim.x)) {
    const Unit un = interleaved_unit(p, it);
    const int cv = un.cb * bx + tx;
    const bool cvalid = cv < p.CV;
    const auto segment = [&](int64_t ra, int64_t rb, int na, int ne, int t) {
      acc_t s1[VEC], s2[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) s1[e] = s2[e] = acc_t(0);
      if (cvalid) {
        acc_t mu[VEC], sc[VEC], sh[VEC];
        const int64_t k0 = static_cast<int64_t>(t) * p.C + cv * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          mu[e] = mean[k0 + e];
          sc[e] = scale[k0 + e];
          sh[e] = shift != nullptr ? shift[k0 + e] : acc_t(0);
        }
        for (int64_t r0 = ra + ty; r0 < rb; r0 += row_step) {
          const int left = static_cast<int>(min64(rb - r0, row_step));
          const int64_t offset = (r0 * p.CV + cv) * VEC;
          Pack<scalar_t, VEC> px[U], pg[U];
          bool ok[U];
          load_batch(px, ok, x + offset, 0, rstride, by, left);
          load_batch(pg, ok, dy + offset, 0, rstride, by, left);
#pragma unroll
          for (int k = 0; k < U; ++k) {
            if (!ok[k]) continue;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const acc_t d = static_cast<acc_t>(px[k].v[e]) - mu[e];
              const acc_t g =
                  relu && !(affine(d, sc[e], sh[e]) > acc_t(0)) ? acc_t(0) : static_cast<acc_t>(pg[k].v[e]);
              s1[e] += g;
              s2[e] += g * d;
            }
          }
        }
      }
      for (int off = 16; off >= bx; off >>= 1) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          s1[e] += __shfl_down_sync(kFullMask, s1[e], off);
          s2[e] += __shfl_down_sync(kFullMask, s2[e], off);
        }
      }
      if (lane < bx) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          sh_s1[warp][lane * VEC + e] = s1[e];
          sh_s2[warp][lane * VEC + e] = s2[e];
        }
      }
      __syncthreads();
      if (tid < bx * VEC) {
        acc_t a1 = 0, a2 = 0;
        for (int w = 0; w < kWarps; ++w) {
          a1 += sh_s1[w][tid];
          a2 += sh_s2[w][tid];
        }
        const int c = un.cb * bx * VEC + tid;
        if (c < p.C) {
          const int64_t row = static_cast<int64_t>(na * p.J + un.j) * p.C;
          part_s1[row + c] = a1;
          part_s2[row + c] = a2;
        }
      }
      if (un.cb == 0)
        for (int m = na + tid; m < ne; m += kThreads) part_count[m * p.J + un.j] = m == na ? rb - ra : 0;
      __syncthreads();
    };
    if (p.J > 1) {
      const int64_t r0 = static_cast<int64_t>(un.n0) * p.S;
      segment(r0 + static_cast<int64_t>(un.j) * p.L, r0 + min64(static_cast<int64_t>(un.j + 1) * p.L, p.S), un.n0,
              un.n0 + 1, task_at(p, un.n0));
    } else {
      for (int n = un.n0; n < un.n1;) {
        const int t = task_at(p, n);
        const int ne = task_run_end(p, n, un.n1, t);
        segment(static_cast<int64_t>(n) * p.S, static_cast<int64_t>(ne) * p.S, n, ne, t);
        n = ne;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// dx = coef_dy·dy' + coef_d·(x − mean) + coef_0, all per (task, channel): GradInputOp over the elementwise
// skeletons above.

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    grad_input_planar_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                             scalar_t* __restrict__ dx, const Plan p, const acc_t* __restrict__ mean,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                             const acc_t* __restrict__ coef_dy, const acc_t* __restrict__ coef_d,
                             const acc_t* __restrict__ coef_0, bool relu) {
  elementwise_planar<scalar_t, acc_t, VEC, U>(
      x, dy, dx, p, GradInputOp<acc_t>{mean, scale, shift, coef_dy, coef_d, coef_0, relu});
}

template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void
    grad_input_interleaved_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  scalar_t* __restrict__ dx, const Plan p, const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                  const acc_t* __restrict__ coef_dy, const acc_t* __restrict__ coef_d,
                                  const acc_t* __restrict__ coef_0, bool relu) {
  elementwise_interleaved<scalar_t, acc_t, VEC, U>(
      x, dy, dx, p, GradInputOp<acc_t>{mean, scale, shift, coef_dy, coef_d, coef_0, relu});
}
// ---------------------------------------------------------------------------------------------------------
// Merges. Block b = t · groups + g combines, for task t and channels [32g, 32g + 32) (one per lane), every
// slot of task t: warp w takes the windows of 32 slots w, w + kMergeWarps, ... in order, votes which slots
// of the window start a segment of task t and folds them in slot order (Chan in double); the warps' results
// are then folded in warp order. Without task_ids the slots of task t are [t·per_task·J, (t+1)·per_task·J).

__device__ __forceinline__ void task_slots(const Plan& p, int t, int& lo, int& hi) {
  if (p.task_of == nullptr) {
    lo = static_cast<int>(min64(static_cast<int64_t>(t) * p.per_task, p.N)) * p.J;
    hi = static_cast<int>(min64(static_cast<int64_t>(t + 1) * p.per_task, p.N)) * p.J;
  } else {
    lo = 0;
    hi = p.slots;
  }
}

// The count of slot s if it starts a segment of task t, else 0.
__device__ __forceinline__ long long slot_count(const Plan& p, const int64_t* __restrict__ part_count, int s,
                                                int hi, int t) {
  if (s >= hi) return 0;
  const long long cnt = part_count[s];
  if (cnt > 0 && p.task_of != nullptr && p.task_of[s / p.J] != t) return 0;
  return cnt;
}

template <typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_moments_kernel(const double* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                         const int64_t* __restrict__ part_count, const Plan p, int groups, double eps,
                         const acc_t* __restrict__ gate, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                         acc_t* __restrict__ invstd, acc_t* __restrict__ scale, acc_t* __restrict__ count) {
  __shared__ double sh_n[kMergeWarps][32], sh_mean[kMergeWarps][32], sh_m2[kMergeWarps][32];
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int t = static_cast<int>(blockIdx.x) / groups, g = static_cast<int>(blockIdx.x) % groups;
  const int c = g * 32 + lane;
  const bool cvalid = c < p.C;
  int lo, hi;
  task_slots(p, t, lo, hi);
  double n = 0, mu = 0, m2 = 0;
  for (int w0 = lo + warp * 32; w0 < hi; w0 += kMergeWarps * 32) {
    const long long cnt = slot_count(p, part_count, w0 + lane, hi, t);
    unsigned mask = __ballot_sync(kFullMask, cnt > 0);
    while (mask != 0u) {
      double nb[kMergeBatch], mb[kMergeBatch];
      acc_t qb[kMergeBatch];
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        const bool use = mask != 0u;
        const int b = use ? __ffs(static_cast<int>(mask)) - 1 : 0;
        mask &= mask - 1u;
        const long long nk = __shfl_sync(kFullMask, cnt, b);
        const int64_t at = static_cast<int64_t>(w0 + b) * p.C + c;
        nb[i] = use ? static_cast<double>(nk) : 0.0;
        mb[i] = use && cvalid ? part_mean[at] : 0.0;
        qb[i] = use && cvalid ? part_m2[at] : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i)
        chan_merge(n, mu, m2, nb[i], mb[i], static_cast<double>(qb[i]));
    }
  }
  sh_n[warp][lane] = n;
  sh_mean[warp][lane] = mu;
  sh_m2[warp][lane] = m2;
  __syncthreads();
  if (warp != 0) return;
  double tn = 0, tm = 0, tq = 0;
  for (int w = 0; w < kMergeWarps; ++w) chan_merge(tn, tm, tq, sh_n[w][lane], sh_mean[w][lane], sh_m2[w][lane]);
  if (cvalid) {
    const int64_t k = static_cast<int64_t>(t) * p.C + c;
    const double v = tn > 0 ? tq / tn : 0.0;
    const acc_t r = static_cast<acc_t>(1.0 / sqrt(v + eps));
    mean[k] = static_cast<acc_t>(tm);
    var[k] = static_cast<acc_t>(v);
    invstd[k] = r;
    scale[k] = gate != nullptr ? gate[k] * r : r;
  }
  if (g == 0 && lane == 0) count[t] = static_cast<acc_t>(tn);
}

// Backward merge: s1, s2 (double) per (task, channel) and, from the element count m of each task, the
// input-gradient coefficients (dx_coefficients). m is counted here from the slots, so no host-side count
// (bincount) is needed.
template <typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_sums_kernel(const acc_t* __restrict__ part_s1, const acc_t* __restrict__ part_s2,
                      const int64_t* __restrict__ part_count, const Plan p, int groups,
                      const acc_t* __restrict__ gate, const acc_t* __restrict__ invstd, bool training,
                      double* __restrict__ s1_out, double* __restrict__ s2_out, acc_t* __restrict__ coef_dy,
                      acc_t* __restrict__ coef_d, acc_t* __restrict__ coef_0) {
  __shared__ double sh_n[kMergeWarps][32], sh_s1[kMergeWarps][32], sh_s2[kMergeWarps][32];
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int t = static_cast<int>(blockIdx.x) / groups, g = static_cast<int>(blockIdx.x) % groups;
  const int c = g * 32 + lane;
  const bool cvalid = c < p.C;
  int lo, hi;
  task_slots(p, t, lo, hi);
  double n = 0, a1 = 0, a2 = 0;
  for (int w0 = lo + warp * 32; w0 < hi; w0 += kMergeWarps * 32) {
    const long long cnt = slot_count(p, part_count, w0 + lane, hi, t);
    unsigned mask = __ballot_sync(kFullMask, cnt > 0);
    while (mask != 0u) {
      double nb[kMergeBatch];
      acc_t v1[kMergeBatch], v2[kMergeBatch];
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        const bool use = mask != 0u;
        const int b = use ? __ffs(static_cast<int>(mask)) - 1 : 0;
        mask &= mask - 1u;
        const long long nk = __shfl_sync(kFullMask, cnt, b);
        const int64_t at = static_cast<int64_t>(w0 + b) * p.C + c;
        nb[i] = use ? static_cast<double>(nk) : 0.0;
        v1[i] = use && cvalid ? part_s1[at] : acc_t(0);
        v2[i] = use && cvalid ? part_s2[at] : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        n += nb[i];
        a1 += static_cast<double>(v1[i]);
        a2 += static_cast<double>(v2[i]);
      }
    }
  }
  sh_n[warp][lane] = n;
  sh_s1[warp][lane] = a1;
  sh_s2[warp][lane] = a2;
  __syncthreads();
  if (warp != 0 || !cvalid) return;
  double m = 0, s1 = 0, s2 = 0;
  for (int w = 0; w < kMergeWarps; ++w) {
    m += sh_n[w][lane];
    s1 += sh_s1[w][lane];
    s2 += sh_s2[w][lane];
  }
  const int64_t k = static_cast<int64_t>(t) * p.C + c;
  s1_out[k] = s1;
  s2_out[k] = s2;
  const DxCoefficients<acc_t> coef = dx_coefficients<acc_t>(gate, invstd, k, s1, s2, m, training);
  coef_dy[k] = coef.dy;
  coef_d[k] = coef.d;
  coef_0[k] = coef.zero;
}

// The cross-process backward's coefficients (tsbn_kernels/sync_batch_norm.py): dx_coefficients of the training
// backward from the sums s1, s2 and the element counts m of every process, given from outside; one thread per
// (task, channel), `units` = T·C.
constexpr int kCoefficientThreads = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kCoefficientThreads)
    dx_coefficients_kernel(const double* __restrict__ s1, const double* __restrict__ s2,
                           const double* __restrict__ count, const acc_t* __restrict__ gate,
                           const acc_t* __restrict__ invstd, int C, int units, acc_t* __restrict__ coef_dy,
                           acc_t* __restrict__ coef_d, acc_t* __restrict__ coef_0) {
  const int k = static_cast<int>(blockIdx.x) * kCoefficientThreads + static_cast<int>(threadIdx.x);
  if (k >= units) return;
  const DxCoefficients<acc_t> coef =
      dx_coefficients<acc_t>(gate, invstd, k, s1[k], s2[k], count[k / C], /*training=*/true);
  coef_dy[k] = coef.dy;
  coef_d[k] = coef.d;
  coef_0[k] = coef.zero;
}


// ---------------------------------------------------------------------------------------------------------
// Slab path: planar input, replicated batch (sample n in task n / per_task), one (task, channel) slab on chip.
//
// A unit is one (task t, channel c): the per_task planes (n, c), n in [t·per_task, (t+1)·per_task), of S
// contiguous values each, planes C·S values apart. One block owns a unit: it loads the slab into dynamic
// shared memory (packs of VEC elements, 16 bytes where aligned; pack q of the slab is pack q % SV of plane
// q / SV and lives at slab[q]), computes the exact statistics or gradient sums of the unit from shared memory
// and writes y or dx from it. Forward: x read once and y written once (2 passes over memory); backward: x and
// dy read once and dx written once (3 passes): the ideal of DESIGN.md §4, with no partial rows and no merge
// kernel. Thread i visits the packs q = i, i + threads, ... in that order in every pass; its position (q,
// offset in memory) advances without a division (the plan holds threads = step_j·SV + step_r).
//
// Numerics. Forward: a true two-pass over the slab, shifted by a pivot (the slab's first value, so that the
// fp32 sums stay at the scale of the spread even when |mean| >> std): pass 1 (during the load) Σ(x − pivot)
// gives the shifted mean mb; pass 2 (over shared memory) M2 = Σ((x − pivot) − mb)²; mean = pivot + mb in
// double. Per-thread sums are in acc_t, combined by a fixed butterfly within each warp and in double across
// the warps in a fixed order (block_sum), so a unit's result depends on the shape and the block size only,
// never on the grid or the schedule. mean, invstd, scale = gate·invstd are rounded exactly as
// merge_moments_kernel rounds them, and y = fma(x − mean, scale, shift), so the backward's relu mask (from the
// saved mean and invstd) matches the forward's y. Backward: s1 = Σdy', s2 = Σdy'·(x − mean) during the load
// (the masked dy' is what goes to shared memory), the dx coefficients from dx_coefficients.
//
// Shared memory and barriers. Every pass of a thread visits the same packs q, so each slot of the slab is
// written and read by one thread only: the slab needs no barrier, and a thread goes on to the next unit's loads
// while others still store y. Only the reductions synchronise, one barrier each (block_sum), and they alternate
// between buffers so that no barrier is needed after the reading: forward, red[0] (mean) and red[1] (M2) each
// written after the barrier that follows every thread's last read of it (red[1] of the last unit is read before
// the next unit's first barrier; red[0] before this unit's second); backward, one reduction per unit, in
// red[unit parity]. Forward 2 barriers per unit, backward 1.

constexpr int kSlabMaxThreads = 1024;
constexpr int kSlabMaxWarps = kSlabMaxThreads / 32;
// Packs in flight per thread and input in the slab kernels: the split kernels' tile depth, halved for 2-byte
// types in 4- and 8-byte packs (bf16 spilled a few registers there under the 64-register bound of 1024-thread
// blocks with ptxas of CUDA 13 for sm_90).
template <typename scalar_t, int VEC, int inputs>
constexpr int slab_depth() {
  return sizeof(scalar_t) == 2 && (VEC == 2 || VEC == 4) ? tile_depth<scalar_t, VEC, inputs>() / 2
                                                         : tile_depth<scalar_t, VEC, inputs>();
}
constexpr int kSlabMinThreads = 64;
// Threads per SM the block size aims at: with U packs of 16 bytes in flight per thread that is 64 KiB of
// loads in flight per SM, about twice what the memory latency needs at the fair share of the bandwidth.
constexpr int kSlabThreadsPerSM = 1024;

struct SlabPlan {
  int T = 0, C = 0;
  int per_task = 1;     // samples per task, N / T
  int SV = 1;           // packs per plane, S / VEC
  int PS = 0;           // packs between two planes of one channel, C · SV
  int packs = 0;        // packs per slab, per_task · SV
  int threads = 0;      // block size, a multiple of 32 in [kSlabMinThreads, kSlabMaxThreads]
  int step_j = 0;       // threads / SV
  int step_r = 0;       // threads % SV
  int step_off = 0;     // step_j · PS + step_r: packs in memory between a thread's consecutive packs
  int units = 0;        // T · C
  bool fits = false;    // every count above fits its field
};

// Block size for a slab kernel of which `resident` blocks fit an SM by their shared memory: about
// kSlabThreadsPerSM threads per SM, a power of two, no more than one tile of `depth` packs per thread needs.
inline int slab_block_threads(int64_t resident, int64_t packs, int depth) {
  const int64_t per_block = std::max<int64_t>(1, kSlabThreadsPerSM / std::max<int64_t>(1, resident));
  int threads = floor_pow2(per_block);
  threads = std::min(threads, ceil_pow2(std::max<int64_t>(1, ceil_div(packs, depth))));
  return std::max(kSlabMinThreads, std::min(kSlabMaxThreads, threads));
}

// The slab plan of an [N, C, S] planar input with T tasks of N / T samples (N % T == 0), packs of `vec`
// elements (vec divides S) and blocks of `threads`.
inline SlabPlan make_slab_plan(int64_t N, int64_t C, int64_t S, int64_t T, int vec, int threads) {
  constexpr int64_t kIntMax = 0x7fffffff;
  SlabPlan p;
  const int64_t per_task = T > 0 ? N / T : 0, SV = S / vec;
  const int64_t packs = per_task * SV;
  // Offsets within a unit are 32-bit (fewer registers): a thread's offset stays below (per_task + step_j) · PS
  // + SV, also after its last step past the unit, and must fit (about 2^31 packs per task; larger inputs take
  // the split path). The unit's origin is 64-bit. Pack indices in the slab stay below packs + 16 · threads.
  p.fits = T >= 1 && N % T == 0 && per_task >= 1 && SV >= 1 && S % vec == 0 && T * C <= kIntMax &&
           packs <= kIntMax / 2 && threads % 32 == 0 && threads >= 32 && threads <= kSlabMaxThreads &&
           C <= kIntMax / SV && per_task + threads / SV <= (kIntMax - SV) / (C * SV);
  if (!p.fits) return p;
  p.T = static_cast<int>(T);
  p.C = static_cast<int>(C);
  p.per_task = static_cast<int>(per_task);
  p.SV = static_cast<int>(SV);
  p.PS = static_cast<int>(C * SV);
  p.packs = static_cast<int>(packs);
  p.threads = threads;
  p.step_j = static_cast<int>(threads / SV);
  p.step_r = static_cast<int>(threads % SV);
  p.step_off = p.step_j * p.PS + p.step_r;
  p.units = static_cast<int>(T * C);
  return p;
}

// First pack of unit (t, c) in memory: plane (t · per_task, c).
__host__ __device__ __forceinline__ int64_t slab_origin(const SlabPlan& p, int t, int c) {
  return (static_cast<int64_t>(t) * p.per_task * p.C + c) * p.SV;
}

// A thread's position in the slab: pack q (its index in shared memory), pack pos of its plane, and off, its
// distance in packs from the slab's origin in memory (< 2^31, see make_slab_plan).
struct SlabCursor {
  int q, pos, off;
};

__device__ __forceinline__ SlabCursor slab_cursor(const SlabPlan& p, int tid) {
  const int j = tid / p.SV;
  SlabCursor cu;
  cu.q = tid;
  cu.pos = tid - j * p.SV;
  cu.off = j * p.PS + cu.pos;
  return cu;
}

// To pack q + threads.
__device__ __forceinline__ void slab_advance(SlabCursor& cu, const SlabPlan& p) {
  cu.q += p.threads;
  cu.pos += p.step_r;
  cu.off += p.step_off;
  if (cu.pos >= p.SV) {
    cu.pos -= p.SV;
    cu.off += p.PS - p.SV;
  }
}

// The block's dynamic shared memory (16-byte aligned). The host simulator (tests/cuda_sim) supplies its own.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef TSBN_DYNAMIC_SMEM
  return TSBN_DYNAMIC_SMEM();
#else
  extern __shared__ __align__(16) unsigned char tsbn_dynamic_smem[];
  return tsbn_dynamic_smem;
#endif
}

// Sum over the 32 lanes, the same bits in every lane: at each level the two operands of a lane and of its
// partner are the same pair, and IEEE addition is commutative.
template <typename T>
__device__ __forceinline__ T warp_allsum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Σ v over the block's `warps` warps, in double, the same bits in every thread: a fixed butterfly in acc_t
// within each warp, the warp sums through buf[warp], a fixed butterfly over them in double. One barrier: the
// caller must not write buf again until every thread has passed a later barrier.
template <typename acc_t>
__device__ __forceinline__ double block_sum(acc_t v, double* buf, int warps) {
  v = warp_allsum(v);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) buf[warp] = static_cast<double>(v);
  __syncthreads();
  return warp_allsum(lane < warps ? buf[lane] : 0.0);
}

// Two sums at once (buf holds 2 · kSlabMaxWarps values); the same rules.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t a, acc_t b, double* buf, int warps, double& sa, double& sb) {
  a = warp_allsum(a);
  b = warp_allsum(b);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) {
    buf[warp] = static_cast<double>(a);
    buf[kSlabMaxWarps + warp] = static_cast<double>(b);
  }
  __syncthreads();
  sa = warp_allsum(lane < warps ? buf[lane] : 0.0);
  sb = warp_allsum(lane < warps ? buf[kSlabMaxWarps + lane] : 0.0);
}

// Training forward of whole units: statistics (mean, biased var, invstd per unit; count per task) and y.
// Dynamic shared memory: packs · sizeof(Pack<scalar_t, VEC>) bytes. Launch with p.threads threads; any grid
// (units are taken in grid stride, each by one block).
template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void __launch_bounds__(kSlabMaxThreads)
    slab_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const SlabPlan p, double eps,
                        const acc_t* __restrict__ gate, const acc_t* __restrict__ shift, bool relu,
                        acc_t* __restrict__ mean, acc_t* __restrict__ var, acc_t* __restrict__ invstd,
                        acc_t* __restrict__ count) {
  using P = Pack<scalar_t, VEC>;
  __shared__ double red[2][kSlabMaxWarps];
  P* const slab = reinterpret_cast<P*>(dynamic_smem());
  const int tid = static_cast<int>(threadIdx.x), warps = p.threads >> 5;
  const SlabCursor start = slab_cursor(p, tid);
  const double m = static_cast<double>(p.packs) * VEC;  // values per unit
  for (int u = static_cast<int>(blockIdx.x); u < p.units; u += static_cast<int>(gridDim.x)) {
    const int t = u / p.C, c = u - t * p.C;  // u = t · C + c, the unit's index in [T, C] tables
    const int64_t origin = slab_origin(p, t, c) * VEC;
    const scalar_t* const xs = x + origin;
    scalar_t* const ys = y + origin;
    const acc_t pivot = static_cast<acc_t>(xs[0]);
    // Pass 1: load the slab (U packs in flight per thread) and sum it, shifted by the pivot.
    acc_t sum = 0;
    for (SlabCursor cu = start; cu.q < p.packs;) {
      P pk[U];
      bool ok[U];
      const int q0 = cu.q;
#pragma unroll
      for (int i = 0; i < U; ++i) {
        ok[i] = cu.q < p.packs;
        if (ok[i]) pk[i] = load_pack<VEC>(xs, cu.off);
        slab_advance(cu, p);
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (!ok[i]) continue;
        slab[q0 + i * p.threads] = pk[i];
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum += static_cast<acc_t>(pk[i].v[e]) - pivot;
      }
    }
    const double mb_d = block_sum(sum, red[0], warps) / m;
    const acc_t mb = static_cast<acc_t>(mb_d);
    // Pass 2, over shared memory: M2 around the shifted mean.
    acc_t sq = 0;
#pragma unroll 4
    for (int q = tid; q < p.packs; q += p.threads) {
      const P v = slab[q];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t d = (static_cast<acc_t>(v.v[e]) - pivot) - mb;
        sq += d * d;
      }
    }
    const double var_d = block_sum(sq, red[1], warps) / m;
    const acc_t r = static_cast<acc_t>(1.0 / sqrt(var_d + eps));
    const acc_t mu = static_cast<acc_t>(static_cast<double>(pivot) + mb_d);
    const acc_t sc = gate != nullptr ? gate[u] * r : r;
    const acc_t sh = shift != nullptr ? shift[u] : acc_t(0);
    if (tid == 0) {
      mean[u] = mu;
      var[u] = static_cast<acc_t>(var_d);
      invstd[u] = r;
      if (c == 0) count[t] = static_cast<acc_t>(m);
    }
    // Pass 3: y from shared memory.
    for (SlabCursor cu = start; cu.q < p.packs;) {
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (cu.q < p.packs) {
          const P v = slab[cu.q];
          P out;
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            out.v[e] = static_cast<scalar_t>(relu_if(affine(static_cast<acc_t>(v.v[e]) - mu, sc, sh), relu));
          store_pack<VEC>(ys, cu.off, out);
        }
        slab_advance(cu, p);
      }
    }
  }
}

// Backward of whole units: s1 = Σdy', s2 = Σdy'·(x − mean) (double, [T, C]) and dx = coef_dy·dy' +
// coef_d·(x − mean) + coef_0 with the coefficients of dx_coefficients (coef_d = coef_0 = 0 in eval); dy' is
// dy masked by the relu recomputed from x. Dynamic shared memory: 2 · packs · sizeof(Pack<scalar_t, VEC>)
// bytes (x, then dy').
template <typename scalar_t, typename acc_t, int VEC, int U>
__global__ void __launch_bounds__(kSlabMaxThreads)
    slab_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, scalar_t* __restrict__ dx,
                         const SlabPlan p, const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                         const acc_t* __restrict__ shift, const acc_t* __restrict__ gate,
                         const acc_t* __restrict__ invstd, bool relu, bool training, double* __restrict__ s1_out,
                         double* __restrict__ s2_out) {
  using P = Pack<scalar_t, VEC>;
  __shared__ double red[2][2 * kSlabMaxWarps];
  P* const sx = reinterpret_cast<P*>(dynamic_smem());
  P* const sg = sx + p.packs;
  const int tid = static_cast<int>(threadIdx.x), warps = p.threads >> 5;
  const SlabCursor start = slab_cursor(p, tid);
  const double m = static_cast<double>(p.packs) * VEC;
  for (int u = static_cast<int>(blockIdx.x); u < p.units; u += static_cast<int>(gridDim.x)) {
    const int t = u / p.C, c = u - t * p.C;
    const int64_t origin = slab_origin(p, t, c) * VEC;
    const scalar_t* const xs = x + origin;
    const scalar_t* const gs = dy + origin;
    scalar_t* const ds = dx + origin;
    const acc_t mu = mean[u], sc = scale[u], sh = shift != nullptr ? shift[u] : acc_t(0);
    acc_t s1 = 0, s2 = 0;
    for (SlabCursor cu = start; cu.q < p.packs;) {
      P px[U], pg[U];
      bool ok[U];
      const int q0 = cu.q;
#pragma unroll
      for (int i = 0; i < U; ++i) {
        ok[i] = cu.q < p.packs;
        if (ok[i]) {
          px[i] = load_pack<VEC>(xs, cu.off);
          pg[i] = load_pack<VEC>(gs, cu.off);
        }
        slab_advance(cu, p);
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (!ok[i]) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t d = static_cast<acc_t>(px[i].v[e]) - mu;
          const bool off = relu && !(affine(d, sc, sh) > acc_t(0));
          if (off) pg[i].v[e] = scalar_t(0);
          const acc_t g = off ? acc_t(0) : static_cast<acc_t>(pg[i].v[e]);
          s1 += g;
          s2 += g * d;
        }
        sx[q0 + i * p.threads] = px[i];
        sg[q0 + i * p.threads] = pg[i];
      }
    }
    double t1, t2;
    block_sum2(s1, s2, red[(u / static_cast<int>(gridDim.x)) & 1], warps, t1, t2);
    const DxCoefficients<acc_t> coef = dx_coefficients<acc_t>(gate, invstd, u, t1, t2, m, training);
    const acc_t a = coef.dy, b = coef.d, z = coef.zero;
    if (tid == 0) {
      s1_out[u] = t1;
      s2_out[u] = t2;
    }
    for (SlabCursor cu = start; cu.q < p.packs;) {
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (cu.q < p.packs) {
          const P vx = sx[cu.q], vg = sg[cu.q];
          P out;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t d = static_cast<acc_t>(vx.v[e]) - mu;
            out.v[e] = static_cast<scalar_t>(a * static_cast<acc_t>(vg.v[e]) + b * d + z);
          }
          store_pack<VEC>(ds, cu.off, out);
        }
        slab_advance(cu, p);
      }
    }
  }
}

}  // namespace bn_kernels
}  // namespace tsbn
