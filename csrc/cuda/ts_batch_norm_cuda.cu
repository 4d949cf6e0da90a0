// Fused task-specific (sigmoid) batch norm on CUDA: training forward, eval forward, backward and the
// running-statistics update. Semantics: tsbn_kernels/reference.py; same op schemas and outputs as the CPU
// kernels (csrc/cpu/ts_batch_norm_cpu.cpp).
//
// Split design (DESIGN.md §4): the input, seen as [N, C, S] (NCHW "planar" or channels-last "interleaved"),
// is cut into tiles of (one sample, a chunk of S, a group of channels). Every tile belongs to one task, and
// there are N·⌈S/chunk⌉·⌈C/group⌉ of them, so the grid fills the GPU whatever T·C is. A tile keeps its values
// in registers and writes a pivot-shifted two-pass mean and M2 (exact for |mean| >> std); a merge kernel
// combines the partials per (task, channel) in tile order with Chan's formula in double — no float atomics,
// deterministic. The apply pass runs its blocks in reverse order so the tiles read last by the statistics
// pass are still in L2, and folds gate, affine, mean and rstd into one scale and shift per (task, channel).
// The backward recomputes the relu mask from x.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../ts_batch_norm_layout.h"

#include "cuda_utils.cuh"

namespace tsbn {
namespace {

constexpr int kThreadsX = 32;       // along the contiguous dimension
constexpr int kThreadsY = 8;
constexpr int kValuesPerThread = 8; // register-resident values per thread in a tile
// Planar tile: 1 channel × (kThreadsX·kThreadsY·kValuesPerThread) positions.
// Interleaved tile: kThreadsX channels × (kThreadsY·kValuesPerThread) positions.
constexpr int kPlanarChunk = kThreadsX * kThreadsY * kValuesPerThread;
constexpr int kInterleavedRows = kThreadsY * kValuesPerThread;

struct Geometry {
  int64_t N, C, S;
  bool interleaved;
  int64_t chunk;       // positions per tile
  int64_t chunks;      // tiles per (sample, channel group)
  int64_t groups;      // channel groups
  int64_t channels_per_group;
  int64_t tiles() const { return N * chunks; }
};

Geometry geometry_of(const at::Tensor& x, bool interleaved) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = g.N && g.C ? x.numel() / (g.N * g.C) : 0;
  g.interleaved = interleaved;
  g.chunk = interleaved ? kInterleavedRows : kPlanarChunk;
  g.chunks = std::max<int64_t>(1, (g.S + g.chunk - 1) / g.chunk);
  g.channels_per_group = interleaved ? kThreadsX : 1;
  g.groups = (g.C + g.channels_per_group - 1) / g.channels_per_group;
  return g;
}

// Element offset of (n, c, s) in the dense layout.
__device__ __forceinline__ int64_t offset_of(bool interleaved, int64_t n, int64_t c, int64_t s, int64_t C,
                                             int64_t S) {
  return interleaved ? (n * S + s) * C + c : (n * C + c) * S + s;
}

// Block-wide sum over threadIdx.y (interleaved: one value per channel lane) or over all threads (planar).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, bool interleaved, acc_t* shared) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  shared[ty * kThreadsX + tx] = v;
  __syncthreads();
  acc_t total = 0;
  if (interleaved) {
    for (int y = 0; y < kThreadsY; ++y) total += shared[y * kThreadsX + tx];
  } else {
    for (int i = 0; i < kThreadsX * kThreadsY; ++i) total += shared[i];
  }
  __syncthreads();
  return total;
}

// The element handled by value slot k of this thread in tile (n, chunk, group); returns false past the end.
struct TileIndex {
  bool valid;
  int64_t c, s;
};

__device__ __forceinline__ TileIndex tile_index(const Geometry& g, int64_t chunk, int64_t group, int k) {
  TileIndex ti;
  if (g.interleaved) {
    ti.c = group * kThreadsX + threadIdx.x;
    ti.s = chunk * g.chunk + k * kThreadsY + threadIdx.y;
  } else {
    ti.c = group;
    ti.s = chunk * g.chunk + (k * kThreadsY + threadIdx.y) * kThreadsX + threadIdx.x;
  }
  ti.valid = ti.c < g.C && ti.s < g.S;
  return ti;
}

template <typename scalar_t, typename acc_t>
__global__ void moments_kernel(const scalar_t* __restrict__ x, Geometry g, acc_t* __restrict__ part_mean,
                               acc_t* __restrict__ part_m2, acc_t* __restrict__ part_count) {
  __shared__ acc_t shared[kThreadsX * kThreadsY];
  const int64_t tile = blockIdx.x, group = blockIdx.y;
  const int64_t n = tile / g.chunks, chunk = tile % g.chunks;
  // Pivot: the tile's first position of this thread's channel, so sums of (x − pivot) stay small.
  const int64_t pivot_c = g.interleaved ? group * kThreadsX + threadIdx.x : group;
  const bool channel_ok = pivot_c < g.C;
  const acc_t pivot = channel_ok ? static_cast<acc_t>(x[offset_of(g.interleaved, n, pivot_c, chunk * g.chunk, g.C, g.S)])
                                 : acc_t(0);
  acc_t values[kValuesPerThread];
  acc_t sum = 0, count = 0;
#pragma unroll
  for (int k = 0; k < kValuesPerThread; ++k) {
    const TileIndex ti = tile_index(g, chunk, group, k);
    values[k] = ti.valid ? static_cast<acc_t>(x[offset_of(g.interleaved, n, ti.c, ti.s, g.C, g.S)]) - pivot : acc_t(0);
    sum += values[k];
    count += ti.valid ? acc_t(1) : acc_t(0);
  }
  const acc_t total = block_sum(sum, g.interleaved, shared);
  const acc_t n_tile = block_sum(count, g.interleaved, shared);
  const acc_t shifted_mean = n_tile > 0 ? total / n_tile : acc_t(0);
  acc_t q = 0;
#pragma unroll
  for (int k = 0; k < kValuesPerThread; ++k) {
    const TileIndex ti = tile_index(g, chunk, group, k);
    const acc_t d = values[k] - shifted_mean;
    q += ti.valid ? d * d : acc_t(0);
  }
  const acc_t m2 = block_sum(q, g.interleaved, shared);
  const bool writer = g.interleaved ? threadIdx.y == 0 : (threadIdx.x == 0 && threadIdx.y == 0);
  if (writer && channel_ok) {
    part_mean[tile * g.C + pivot_c] = pivot + shifted_mean;
    part_m2[tile * g.C + pivot_c] = m2;
    if (group == 0 && threadIdx.x == 0) part_count[tile] = n_tile;
  }
}

template <typename acc_t>
__global__ void merge_moments_kernel(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                                     const acc_t* __restrict__ part_count, const int64_t* __restrict__ task_of,
                                     int64_t tiles, int64_t chunks, int64_t C, double eps, acc_t* __restrict__ mean,
                                     acc_t* __restrict__ var, acc_t* __restrict__ invstd, acc_t* __restrict__ count) {
  const int64_t t = blockIdx.y;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double n_acc = 0, mu = 0, m2 = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (task_of[tile / chunks] != t) continue;
    const double nb = part_count[tile];
    if (nb <= 0) continue;
    const double mb = part_mean[tile * C + c], qb = part_m2[tile * C + c];
    const double n_new = n_acc + nb, delta = mb - mu;
    mu += delta * nb / n_new;
    m2 += qb + delta * delta * n_acc * nb / n_new;
    n_acc = n_new;
  }
  const double v = n_acc > 0 ? m2 / n_acc : 0.0;
  mean[t * C + c] = static_cast<acc_t>(mu);
  var[t * C + c] = static_cast<acc_t>(v);
  invstd[t * C + c] = static_cast<acc_t>(rsqrt(v + eps));
  if (c == 0) count[t] = static_cast<acc_t>(n_acc);
}

// y = (x − mean)·scale + shift (+ relu), blocks in reverse order.
template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                             const int64_t* __restrict__ task_of, const acc_t* __restrict__ mean,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, bool relu) {
  const int64_t total = g.N * g.C * g.S;
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  for (int64_t i = block * blockDim.x + threadIdx.x; i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = g.interleaved ? i % g.C : (i / g.S) % g.C;
    const int64_t n = i / (g.C * g.S);
    const int64_t k = task_of[n] * g.C + c;
    acc_t v = (static_cast<acc_t>(x[i]) - mean[k]) * scale[k] + shift[k];
    if (relu) v = v > acc_t(0) ? v : acc_t(0);
    y[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_sums_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, Geometry g,
                                 const int64_t* __restrict__ task_of, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, bool relu,
                                 acc_t* __restrict__ part_s1, acc_t* __restrict__ part_s2) {
  __shared__ acc_t shared[kThreadsX * kThreadsY];
  const int64_t tile = blockIdx.x, group = blockIdx.y;
  const int64_t n = tile / g.chunks, chunk = tile % g.chunks;
  const int64_t t = task_of[n];
  acc_t s1 = 0, s2 = 0;
#pragma unroll
  for (int k = 0; k < kValuesPerThread; ++k) {
    const TileIndex ti = tile_index(g, chunk, group, k);
    if (!ti.valid) continue;
    const int64_t o = offset_of(g.interleaved, n, ti.c, ti.s, g.C, g.S);
    const int64_t kk = t * g.C + ti.c;
    const acc_t d = static_cast<acc_t>(x[o]) - mean[kk];
    acc_t gv = static_cast<acc_t>(dy[o]);
    if (relu && !(d * scale[kk] + shift[kk] > acc_t(0))) gv = 0;
    s1 += gv;
    s2 += gv * d;
  }
  const acc_t total1 = block_sum(s1, g.interleaved, shared);
  const acc_t total2 = block_sum(s2, g.interleaved, shared);
  const int64_t c = g.interleaved ? group * kThreadsX + threadIdx.x : group;
  const bool writer = g.interleaved ? threadIdx.y == 0 : (threadIdx.x == 0 && threadIdx.y == 0);
  if (writer && c < g.C) {
    part_s1[tile * g.C + c] = total1;
    part_s2[tile * g.C + c] = total2;
  }
}

template <typename acc_t>
__global__ void merge_sums_kernel(const acc_t* __restrict__ part_s1, const acc_t* __restrict__ part_s2,
                                  const int64_t* __restrict__ task_of, int64_t tiles, int64_t chunks, int64_t C,
                                  double* __restrict__ s1, double* __restrict__ s2) {
  const int64_t t = blockIdx.y;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double a = 0, b = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (task_of[tile / chunks] != t) continue;
    a += part_s1[tile * C + c];
    b += part_s2[tile * C + c];
  }
  s1[t * C + c] = a;
  s2[t * C + c] = b;
}

// dx = A·dy' + B·(x − mean) + K, all per (task, channel).
template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  scalar_t* __restrict__ dx, Geometry g, const int64_t* __restrict__ task_of,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, const acc_t* __restrict__ coef_dy,
                                  const acc_t* __restrict__ coef_d, const acc_t* __restrict__ coef_0, bool relu) {
  const int64_t total = g.N * g.C * g.S;
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  for (int64_t i = block * blockDim.x + threadIdx.x; i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = g.interleaved ? i % g.C : (i / g.S) % g.C;
    const int64_t n = i / (g.C * g.S);
    const int64_t k = task_of[n] * g.C + c;
    const acc_t d = static_cast<acc_t>(x[i]) - mean[k];
    acc_t gv = static_cast<acc_t>(dy[i]);
    if (relu && !(d * scale[k] + shift[k] > acc_t(0))) gv = 0;
    dx[i] = static_cast<scalar_t>(coef_dy[k] * gv + coef_d[k] * d + coef_0[k]);
  }
}

at::Tensor task_of_samples(const c10::optional<at::Tensor>& task_ids, int64_t N, int64_t T, const at::Tensor& x) {
  if (task_ids.has_value() && task_ids->defined()) {
    TORCH_CHECK_VALUE(task_ids->dim() == 1 && task_ids->size(0) == N, "ts_batch_norm: task_ids must have shape (",
                      N, ",)");
    TORCH_CHECK_VALUE(task_ids->device() == x.device(), "ts_batch_norm: task_ids must be on ", x.device());
    // Range checks need the values on the host; the Python layer validates them before any kernel runs.
    return task_ids->to(at::kLong).contiguous();
  }
  TORCH_CHECK_VALUE(N % T == 0, "ts_batch_norm: batch size ", N, " is not divisible by num_tasks=", T);
  return at::arange(N, x.options().dtype(at::kLong)).div(N / T, "floor");
}

at::Tensor table(const c10::optional<at::Tensor>& t, int64_t T, int64_t C, double fill, at::ScalarType acc,
                 const at::Tensor& x, const char* name) {
  if (!(t.has_value() && t->defined())) return at::full({T, C}, fill, x.options().dtype(acc));
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == T && t->size(1) == C, "ts_batch_norm: ", name,
                    " must have shape (", T, ", ", C, "), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), "ts_batch_norm: ", name, " must be on ", x.device());
  return t->detach().to(acc).contiguous();
}

int elementwise_blocks(int64_t total, c10::DeviceIndex device) {
  const int64_t wanted = (total + 255) / 256;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sm_count(device)) * 32)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ts_bn_forward_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, double eps, bool sigmoid_gate,
    bool relu) {
  TORCH_CHECK_VALUE(x_in.dim() >= 2 && x_in.dim() <= 5, "ts_batch_norm: expected a 2D to 5D input, got ",
                    x_in.dim(), "D");
  TORCH_CHECK_VALUE(num_tasks >= 1, "ts_batch_norm: num_tasks must be >= 1");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool interleaved = is_interleaved(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in, interleaved));
  const Geometry g = geometry_of(x, interleaved);
  const int64_t T = num_tasks, C = g.C;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor task_of = task_of_samples(task_ids, g.N, T, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor mean, var, invstd, count;
  if (training) {
    TORCH_CHECK_VALUE(x.numel() > 0, "ts_batch_norm: cannot normalise an empty input when training");
    mean = at::empty({T, C}, x.options().dtype(acc));
    var = at::empty_like(mean);
    invstd = at::empty_like(mean);
    count = at::empty({T}, x.options().dtype(acc));
    at::Tensor part_mean = at::empty({g.tiles(), C}, x.options().dtype(acc));
    at::Tensor part_m2 = at::empty_like(part_mean);
    at::Tensor part_count = at::empty({g.tiles()}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_moments_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      moments_kernel<scalar_t, acc_t><<<dim3(g.tiles(), g.groups), dim3(kThreadsX, kThreadsY), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), g, part_mean.data_ptr<acc_t>(), part_m2.data_ptr<acc_t>(),
          part_count.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_moments_kernel<acc_t><<<dim3((C + 127) / 128, T), 128, 0, stream>>>(
          part_mean.const_data_ptr<acc_t>(), part_m2.const_data_ptr<acc_t>(), part_count.const_data_ptr<acc_t>(),
          task_of.const_data_ptr<int64_t>(), g.tiles(), g.chunks, C, eps, mean.data_ptr<acc_t>(),
          var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), count.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                          running_var->defined(),
                      "ts_batch_norm: eval needs running_mean and running_var");
    mean = table(running_mean, T, C, 0.0, acc, x, "running_mean").clone();
    var = table(running_var, T, C, 1.0, acc, x, "running_var").clone();
    invstd = (var + eps).rsqrt();
    count = at::zeros({T}, x.options().dtype(acc));
  }
  at::Tensor a = table(weight, T, C, 1.0, acc, x, "weight");
  if (sigmoid_gate && weight.has_value() && weight->defined()) a = a.sigmoid();
  const at::Tensor scale = (a * invstd).contiguous();
  const at::Tensor shift = table(bias, T, C, 0.0, acc, x, "bias");
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_apply_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      apply_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel(), x.device().index()), 256, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, task_of.const_data_ptr<int64_t>(),
          mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {y, mean, invstd, var, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ts_bn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, bool sigmoid_gate, bool relu) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x_in.sizes(), "ts_batch_norm backward: grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool interleaved = is_interleaved(x_in);
  const at::MemoryFormat format = layout_of(x_in, interleaved);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(format);
  const Geometry g = geometry_of(x, interleaved);
  const int64_t T = num_tasks, C = g.C;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor task_of = task_of_samples(task_ids, g.N, T, x);
  const at::Tensor mean = mean_in.to(acc).contiguous(), invstd = invstd_in.to(acc).contiguous();
  TORCH_CHECK_VALUE(mean.numel() == T * C && invstd.numel() == T * C,
                    "ts_batch_norm backward: saved statistics must have shape (", T, ", ", C, ")");
  at::Tensor a = table(weight, T, C, 1.0, acc, x, "weight");
  if (sigmoid_gate && weight.has_value() && weight->defined()) a = a.sigmoid();
  const at::Tensor scale = (a * invstd).contiguous();
  const at::Tensor shift = table(bias, T, C, 0.0, acc, x, "bias");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor s1 = at::zeros({T, C}, x.options().dtype(at::kDouble));
  at::Tensor s2 = at::zeros({T, C}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    at::Tensor part_s1 = at::empty({g.tiles(), C}, x.options().dtype(acc));
    at::Tensor part_s2 = at::empty_like(part_s1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_grad_sums_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      grad_sums_kernel<scalar_t, acc_t><<<dim3(g.tiles(), g.groups), dim3(kThreadsX, kThreadsY), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), g, task_of.const_data_ptr<int64_t>(),
          mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), relu,
          part_s1.data_ptr<acc_t>(), part_s2.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_sums_kernel<acc_t><<<dim3((C + 127) / 128, T), 128, 0, stream>>>(
          part_s1.const_data_ptr<acc_t>(), part_s2.const_data_ptr<acc_t>(), task_of.const_data_ptr<int64_t>(),
          g.tiles(), g.chunks, C, s1.data_ptr<double>(), s2.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Per-(task, channel) coefficients: [T, C] tensor algebra, negligible next to the passes over x.
  const at::Tensor m = at::bincount(task_of, {}, T).to(at::kDouble).mul(static_cast<double>(g.S)).clamp_min(1)
                           .unsqueeze(1);
  const at::Tensor r = invstd.to(at::kDouble), ar = a.to(at::kDouble) * r;
  const at::Tensor s2x = s2 * r;
  const at::Tensor coef_dy = ar.to(acc).contiguous();
  const at::Tensor coef_d = training ? (-ar * r * s2x / m).to(acc).contiguous() : at::zeros_like(coef_dy);
  const at::Tensor coef_0 = training ? (-ar * s1 / m).to(acc).contiguous() : at::zeros_like(coef_dy);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_grad_input_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      grad_input_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel(), x.device().index()), 256, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), g,
          task_of.const_data_ptr<int64_t>(), mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(), coef_dy.const_data_ptr<acc_t>(), coef_d.const_data_ptr<acc_t>(),
          coef_0.const_data_ptr<acc_t>(), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor dweight = at::empty({0}, x.options());
  if (weight.has_value() && weight->defined()) {
    at::Tensor dw = s2x;
    if (sigmoid_gate) {
      const at::Tensor sg = weight->to(at::kDouble).sigmoid();
      dw = dw * sg * (1 - sg);
    }
    dweight = dw.to(weight->scalar_type());
  }
  at::Tensor dbias = bias.has_value() && bias->defined() ? s1.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsbn, CUDA, m) {
  m.impl("ts_bn_forward", &ts_bn_forward_cuda);
  m.impl("ts_bn_backward", &ts_bn_backward_cuda);
}

}  // namespace tsbn
