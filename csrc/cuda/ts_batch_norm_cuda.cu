// Fused task-specific (sigmoid) batch norm on CUDA: training forward, eval forward and backward (the
// running-statistics update is the device-generic op in ts_batch_norm_schema.cpp). Semantics:
// tsbn_kernels/reference.py; same op schemas and outputs as the CPU kernels (csrc/cpu/ts_batch_norm_cpu.cpp).
//
// Passes (kernels and their design: ts_batch_norm_kernels.cuh):
//   training forward  moments (reads x)  -> merge_moments ([T, C] stats and scale)  -> apply (x -> y)
//   eval forward      apply with the running statistics
//   backward          grad_sums (x, dy)  -> merge_sums (s1, s2, counts, dx coefficients) -> grad_input
// Planar inputs of the replicated batch (no task_ids) take the slab path where one (task, channel) unit fits
// in shared memory (slab_config): one block per unit, training forward = slab_forward (x -> y and the [T, C]
// statistics, 2 passes over memory), backward = slab_backward (x, dy -> dx and s1, s2, 3 passes).
// TSBN_CUDA_SLAB (read on every call) overrides the choice: 0 always splits, 1 takes the slab path wherever
// it fits, unset or "auto" applies the heuristic below.
// No host synchronisation anywhere (CUDA-graph capturable): the per-task element counts come out of the
// merge kernels, task ids are read on the device only, and every [T, C] step is a kernel or an ATen op.
// Deterministic: fixed-order reductions, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../ts_batch_norm_checks.h"
#include "../ts_batch_norm_layout.h"

#include "cuda_utils.cuh"
#include "ts_batch_norm_kernels.cuh"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace tsbn {
namespace {

using bn_kernels::kMergeThreads;
using bn_kernels::kThreads;
using bn_kernels::Plan;

// Units per SM the plans aim at; a grid of the resident blocks loops over them.
constexpr int64_t kUnitsPerSM = 8;

// Resident blocks of `kernel` per SM, queried once per (kernel, device). The occupancy query enqueues no
// work, so it is also allowed while a CUDA graph is being captured.
int blocks_per_sm(const void* kernel, int threads, c10::DeviceIndex device) {
  static QueryCache<std::pair<const void*, int>, int> cache;
  return cache.get(std::make_pair(kernel, static_cast<int>(device)), [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    return std::max(blocks, 1);
  });
}

// As many blocks as are resident at once, at most one per unit (grid.x is far below 2^31 - 1).
template <typename Kernel>
int pass_grid(Kernel kernel, const Plan& p, c10::DeviceIndex device) {
  const int64_t resident =
      static_cast<int64_t>(blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, device)) * sm_count(device);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.units, resident)));
}

// Task of every sample: an int32 copy of task_ids, or none for the replicated batch (sample n is in task
// n / (N / T), computed on the device).
struct Tasks {
  at::Tensor ids;
  int64_t per_task = 1;
  const int32_t* data() const { return ids.defined() ? ids.const_data_ptr<int32_t>() : nullptr; }
};

Tasks task_map(const c10::optional<at::Tensor>& task_ids, int64_t N, int64_t T, const at::Tensor& x) {
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "ts_batch_norm: batch size ", N,
                    " exceeds the CUDA kernels' limit of 2^31 - 1 samples");
  Tasks tasks;
  if (task_ids.has_value() && task_ids->defined()) {
    TORCH_CHECK_VALUE(task_ids->dim() == 1 && task_ids->size(0) == N, "ts_batch_norm: task_ids must have shape (",
                      N, ",), got ", task_ids->sizes());
    TORCH_CHECK_TYPE(at::isIntegralType(task_ids->scalar_type(), /*includeBool=*/false),
                     "ts_batch_norm: task_ids must be an integer tensor, got ", task_ids->scalar_type());
    TORCH_CHECK_VALUE(task_ids->device() == x.device(), "ts_batch_norm: task_ids must be on ", x.device());
    // Values must lie in [0, T): range checks need them on the host, so the Python layer validates them
    // (its one host sync) before any kernel runs.
    tasks.ids = task_ids->to(at::kInt).contiguous();
    return tasks;
  }
  TORCH_CHECK_VALUE(N % T == 0, "ts_batch_norm: batch size ", N, " is not divisible by num_tasks=", T);
  tasks.per_task = std::max<int64_t>(1, N / T);
  return tasks;
}

// A [T, C] parameter in the accumulation type, or an undefined tensor when absent (kernels then use the
// neutral value).
at::Tensor acc_table(const c10::optional<at::Tensor>& t, int64_t T, int64_t C, at::ScalarType acc,
                     const at::Tensor& x, const char* name) {
  if (!(t.has_value() && t->defined())) return at::Tensor();
  check_table_shape(*t, T, C, "ts_batch_norm", name);
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "ts_batch_norm: ", name, " must be floating point");
  TORCH_CHECK_VALUE(t->device() == x.device(), "ts_batch_norm: ", name, " must be on ", x.device());
  return t->detach().to(acc).contiguous();
}

// The per-(task, channel) scale a: sigmoid(weight), weight, or undefined (1) without affine.
at::Tensor gate_table(const c10::optional<at::Tensor>& weight, int64_t T, int64_t C, at::ScalarType acc,
                      bool sigmoid_gate, const at::Tensor& x) {
  at::Tensor a = acc_table(weight, T, C, acc, x, "weight");
  if (a.defined() && sigmoid_gate) a = a.sigmoid();
  return a;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Elements per pack: 16 bytes when every pointer is aligned to it and the contiguous extent (S for planar,
// C for interleaved) is a multiple of it, else the largest smaller power of two that qualifies.
template <typename scalar_t>
int pick_vec(bool interleaved, int64_t C, int64_t S, std::initializer_list<const void*> pointers) {
  const int64_t extent = interleaved ? C : S;
  for (int vec = static_cast<int>(16 / sizeof(scalar_t)); vec > 1; vec /= 2) {
    bool ok = extent % vec == 0;
    for (const void* q : pointers) ok = ok && reinterpret_cast<std::uintptr_t>(q) % (vec * sizeof(scalar_t)) == 0;
    if (ok) return vec;
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>) for the pack width chosen at run time.
template <typename scalar_t, typename F>
void with_vec(int vec, F&& f) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (vec == 8) return f(std::integral_constant<int, 8>());
  }
  if constexpr (sizeof(scalar_t) <= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>());
  }
  if (vec == 2) return f(std::integral_constant<int, 2>());
  f(std::integral_constant<int, 1>());
}

Plan plan_for(int64_t N, int64_t C, int64_t S, bool interleaved, int vec, int depth, const Tasks& tasks,
              c10::DeviceIndex device) {
  const Plan p = bn_kernels::make_plan(N, C, S, interleaved, vec, depth, kUnitsPerSM * sm_count(device),
                                       tasks.data(), tasks.per_task);
  TORCH_CHECK(p.fits, "ts_batch_norm: input of shape [N=", N, ", C=", C, ", S=", S,
              "] exceeds the 32-bit sample, channel and partial-row counts of the CUDA kernels");
  return p;
}

// One merge block per (task, 32 channels).
int merge_groups(int64_t C) { return static_cast<int>((C + 31) / 32); }

int merge_grid(int64_t T, int64_t C) {
  const int64_t blocks = T * ((C + 31) / 32);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ts_batch_norm: num_tasks · channels too large");
  return static_cast<int>(blocks);
}

// ---- Slab path (bn_kernels::slab_forward_kernel / slab_backward_kernel) ----

// The automatic choice takes the slab path only where it should beat the split design's extra passes:
// - at least kSlabMinUnitsPerSM units (blocks) per SM, so that the grid of T·C blocks fills the GPU;
// - at least kSlabMinBlocksPerSM resident blocks per SM, so that one block's loads overlap another's
//   reductions and stores (with one block per SM the SM stops reading memory between its load phase and the
//   next unit's; not measured yet, so left to TSBN_CUDA_SLAB=1);
// - planes of at least kSlabMinPlaneBytes, so that each plane's part of a warp's load is whole 128-byte lines
//   (a block per (task, channel) reads short planes C·S values apart; the split path's lanes then cover
//   neighbouring channels instead).
constexpr int64_t kSlabMinUnitsPerSM = 2;
constexpr int kSlabMinBlocksPerSM = 2;
constexpr int64_t kSlabMinPlaneBytes = 128;

enum class SlabMode { kOff, kAuto, kPrefer };

// TSBN_CUDA_SLAB, read on every call so that tests and benchmarks can compare both paths in one process.
SlabMode slab_mode() {
  const char* env = std::getenv("TSBN_CUDA_SLAB");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return SlabMode::kAuto;
  if (std::strcmp(env, "0") == 0) return SlabMode::kOff;
  if (std::strcmp(env, "1") == 0) return SlabMode::kPrefer;
  TORCH_CHECK_VALUE(false, "TSBN_CUDA_SLAB must be 0 (split path), 1 (slab path wherever a unit fits in shared "
                    "memory) or auto (the default), got '", env, "'");
  return SlabMode::kAuto;
}

// The dynamic shared memory a slab kernel may use on `device`: the opt-in maximum per block less its static
// shared memory. The first call per (kernel, device) raises the kernel's limit to it with cudaFuncSetAttribute
// (a function attribute: no work is enqueued and no stream is touched, so this also works while a CUDA graph
// is being captured; it is done once, normally by the warm-up call before any capture). Also caps the block
// size at the kernel's maxThreadsPerBlock.
struct SlabKernelLimits {
  int64_t max_dynamic = 0;
  int max_threads = 0;
};

SlabKernelLimits slab_kernel_limits(const void* kernel, c10::DeviceIndex device) {
  static QueryCache<std::pair<const void*, int>, SlabKernelLimits> cache;
  return cache.get(std::make_pair(kernel, static_cast<int>(device)), [&] {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    SlabKernelLimits limits;
    limits.max_dynamic =
        std::max<int64_t>(0, static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes));
    limits.max_threads = std::min(attr.maxThreadsPerBlock, bn_kernels::kSlabMaxThreads);
    if (limits.max_dynamic > 0)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(limits.max_dynamic)));
    return limits;
  });
}

// Resident blocks of a slab kernel per SM for a block size and dynamic shared memory size (the occupancy
// query enqueues no work), cached.
int slab_blocks_per_sm(const void* kernel, int threads, int64_t smem, c10::DeviceIndex device) {
  static QueryCache<std::tuple<const void*, int, int, int64_t>, int> cache;
  return cache.get(std::make_tuple(kernel, static_cast<int>(device), threads, smem), [&] {
    int blocks = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, static_cast<size_t>(smem)));
    return blocks;
  });
}

struct SlabConfig {
  bool use = false;
  bn_kernels::SlabPlan plan;
  int64_t smem = 0;        // dynamic shared memory per block, bytes
  int blocks_per_sm = 0;   // resident blocks per SM at that size
};

// Whether an [N, C, S] input takes the slab path, and its launch configuration. `streams`: slabs held per
// unit (forward 1: x; backward 2: x and dy'), `vec` and `depth` the kernel's pack width and tile depth.
SlabConfig slab_config(const void* kernel, int64_t N, int64_t C, int64_t S, int64_t T, bool interleaved,
                       const Tasks& tasks, int vec, int depth, int64_t element_size, int streams,
                       c10::DeviceIndex device) {
  SlabConfig cfg;
  const SlabMode mode = slab_mode();
  if (mode == SlabMode::kOff || interleaved || tasks.ids.defined() || N <= 0 || C <= 0 || S <= 0 || T < 1 ||
      N % T != 0)
    return cfg;
  const SlabKernelLimits limits = slab_kernel_limits(kernel, device);
  const int64_t per_task = N / T;
  const int64_t per_sample = S * element_size * streams;  // bytes of one sample's planes in a unit
  if (limits.max_threads < bn_kernels::kSlabMinThreads || per_task > limits.max_dynamic / per_sample) return cfg;
  const int64_t smem = per_task * per_sample;
  const int by_smem = slab_blocks_per_sm(kernel, bn_kernels::kSlabMinThreads, smem, device);
  if (by_smem < 1) return cfg;
  const int threads =
      std::min(limits.max_threads, bn_kernels::slab_block_threads(by_smem, per_task * (S / vec), depth));
  const bn_kernels::SlabPlan p = bn_kernels::make_slab_plan(N, C, S, T, vec, threads);
  if (!p.fits) return cfg;
  const int blocks = slab_blocks_per_sm(kernel, threads, smem, device);
  if (blocks < 1) return cfg;
  if (mode == SlabMode::kAuto && (T * C < kSlabMinUnitsPerSM * sm_count(device) || blocks < kSlabMinBlocksPerSM ||
                                  S * element_size < kSlabMinPlaneBytes))
    return cfg;
  cfg.use = true;
  cfg.plan = p;
  cfg.smem = smem;
  cfg.blocks_per_sm = blocks;
  return cfg;
}

// ---- The split design's passes, shared by the single-process ops and the cross-process ones
// (ts_bn_batch_stats, ts_bn_backward_reduce, ts_bn_backward_elemt: tsbn_kernels/sync_batch_norm.py runs its
// collectives on the [T, C] results between them) ----

// x as the kernels read it: in their layout, as [N, C, S], with its accumulation type and task map.
struct Input {
  bool interleaved = false;
  at::Tensor x;
  int64_t N = 0, C = 0, S = 0;
  at::ScalarType acc = at::kFloat;
  Tasks tasks;
};

Input kernel_input(const at::Tensor& x_in, const c10::optional<at::Tensor>& task_ids, int64_t num_tasks,
                   const char* what) {
  TORCH_CHECK_VALUE(x_in.dim() >= 2 && x_in.dim() <= 5, what, ": expected a 2D to 5D input, got ", x_in.dim(), "D");
  TORCH_CHECK_VALUE(num_tasks >= 1, what, ": num_tasks must be >= 1");
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), "ts_batch_norm: input must be floating point, got ",
                   x_in.scalar_type());
  Input in;
  in.interleaved = is_interleaved(x_in);
  in.x = in_layout(x_in, in.interleaved);
  in.N = in.x.size(0);
  in.C = in.x.size(1);
  in.S = in.N && in.C ? in.x.numel() / (in.N * in.C) : 0;
  in.acc = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.tasks = task_map(task_ids, in.N, num_tasks, in.x);
  return in;
}

// Statistics pass and merge: mean, biased var, invstd = rsqrt(var + eps), scale = gate·invstd ([T, C]) and the
// element count ([T]) of every task of x. Partial means in double: pivot + shifted mean keeps |mean| >> std
// exact through the merge.
template <typename scalar_t, typename acc_t, int VEC, int U>
void split_batch_stats(const Input& in, const Plan& p, int64_t T, double eps, const at::Tensor& gate,
                       const at::Tensor& mean, const at::Tensor& var, const at::Tensor& invstd,
                       const at::Tensor& scale, const at::Tensor& count, c10::DeviceIndex device,
                       cudaStream_t stream) {
  const int64_t C = in.C;
  const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
  const at::Tensor part_mean = at::empty({p.slots, C}, in.x.options().dtype(at::kDouble));
  const at::Tensor part_m2 = at::empty({p.slots, C}, mean.options());
  const at::Tensor part_count = at::empty({p.slots}, in.x.options().dtype(at::kLong));
  if (in.interleaved) {
    const auto kernel = bn_kernels::moments_interleaved_kernel<scalar_t, acc_t, VEC, U>;
    kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
        xp, p, part_mean.data_ptr<double>(), part_m2.data_ptr<acc_t>(), part_count.data_ptr<int64_t>());
  } else {
    const auto kernel = bn_kernels::moments_planar_kernel<scalar_t, acc_t, VEC, U>;
    kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
        xp, p, part_mean.data_ptr<double>(), part_m2.data_ptr<acc_t>(), part_count.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_kernels::merge_moments_kernel<acc_t><<<merge_grid(T, C), kMergeThreads, 0, stream>>>(
      part_mean.const_data_ptr<double>(), part_m2.const_data_ptr<acc_t>(), part_count.const_data_ptr<int64_t>(), p,
      merge_groups(C), eps, data_or_null<acc_t>(gate), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
      invstd.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), count.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What every backward pass reads: x, dy laid out like x, and the [T, C] tables in the accumulation type (gate
// and shift undefined where absent).
struct BackwardInputs : Input {
  at::Tensor dy;
  at::Tensor mean, invstd, gate, shift, scale;
};

BackwardInputs backward_inputs(const at::Tensor& grad_y, const at::Tensor& x_in,
                               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool sigmoid_gate) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x_in.sizes(), "ts_batch_norm backward: grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x_in.sizes());
  BackwardInputs in;
  static_cast<Input&>(in) = kernel_input(x_in, task_ids, num_tasks, "ts_batch_norm backward");
  in.dy = in_layout(grad_y.to(in.x.scalar_type()), in.interleaved);
  const int64_t T = num_tasks;
  check_table_shape(mean, T, in.C, "ts_batch_norm backward", "mean");
  check_table_shape(invstd, T, in.C, "ts_batch_norm backward", "invstd");
  for (const at::Tensor* t : {&grad_y, &mean, &invstd})
    TORCH_CHECK_VALUE(t->device() == x_in.device(), "ts_batch_norm backward: grad_y, mean and invstd must be on ",
                      x_in.device(), ", got ", t->device());
  in.mean = mean.to(in.acc).contiguous();
  in.invstd = invstd.to(in.acc).contiguous();
  in.gate = gate_table(weight, T, in.C, in.acc, sigmoid_gate, in.x);
  in.shift = acc_table(bias, T, in.C, in.acc, in.x, "bias");
  in.scale = in.gate.defined() ? (in.gate * in.invstd).contiguous() : in.invstd;
  return in;
}

// Gradient-sums pass and merge: s1 = Σdy', s2 = Σdy'·(x − mean) (double, [T, C]) of x's tasks and the dx
// coefficients from x's own element counts.
template <typename scalar_t, typename acc_t, int VEC, int U>
void split_grad_sums(const BackwardInputs& in, const Plan& p, int64_t T, bool relu, bool training,
                     const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& coef_dy, const at::Tensor& coef_d,
                     const at::Tensor& coef_0, c10::DeviceIndex device, cudaStream_t stream) {
  const int64_t C = in.C;
  const at::Tensor part_s1 = at::empty({p.slots, C}, in.x.options().dtype(in.acc));
  const at::Tensor part_s2 = at::empty_like(part_s1);
  const at::Tensor part_count = at::empty({p.slots}, in.x.options().dtype(at::kLong));
  const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
  const scalar_t* gp = in.dy.const_data_ptr<scalar_t>();
  const acc_t* mp = in.mean.const_data_ptr<acc_t>();
  const acc_t* sp = in.scale.const_data_ptr<acc_t>();
  const acc_t* hp = data_or_null<acc_t>(in.shift);
  if (in.interleaved) {
    const auto kernel = bn_kernels::grad_sums_interleaved_kernel<scalar_t, acc_t, VEC, U>;
    kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
        xp, gp, p, mp, sp, hp, relu, part_s1.data_ptr<acc_t>(), part_s2.data_ptr<acc_t>(),
        part_count.data_ptr<int64_t>());
  } else {
    const auto kernel = bn_kernels::grad_sums_planar_kernel<scalar_t, acc_t, VEC, U>;
    kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
        xp, gp, p, mp, sp, hp, relu, part_s1.data_ptr<acc_t>(), part_s2.data_ptr<acc_t>(),
        part_count.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_kernels::merge_sums_kernel<acc_t><<<merge_grid(T, C), kMergeThreads, 0, stream>>>(
      part_s1.const_data_ptr<acc_t>(), part_s2.const_data_ptr<acc_t>(), part_count.const_data_ptr<int64_t>(), p,
      merge_groups(C), data_or_null<acc_t>(in.gate), in.invstd.const_data_ptr<acc_t>(), training,
      s1.data_ptr<double>(), s2.data_ptr<double>(), coef_dy.data_ptr<acc_t>(), coef_d.data_ptr<acc_t>(),
      coef_0.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dx pass: dx = coef_dy·dy' + coef_d·(x − mean) + coef_0.
template <typename scalar_t, typename acc_t, int VEC, int U>
void split_grad_input(const BackwardInputs& in, const Plan& p, bool relu, const at::Tensor& coef_dy,
                      const at::Tensor& coef_d, const at::Tensor& coef_0, const at::Tensor& dx,
                      c10::DeviceIndex device, cudaStream_t stream) {
  const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
  const scalar_t* gp = in.dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const acc_t* mp = in.mean.const_data_ptr<acc_t>();
  const acc_t* sp = in.scale.const_data_ptr<acc_t>();
  const acc_t* hp = data_or_null<acc_t>(in.shift);
  if (in.interleaved) {
    const auto kernel = bn_kernels::grad_input_interleaved_kernel<scalar_t, acc_t, VEC, U>;
    kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
        xp, gp, dxp, p, mp, sp, hp, coef_dy.const_data_ptr<acc_t>(), coef_d.const_data_ptr<acc_t>(),
        coef_0.const_data_ptr<acc_t>(), relu);
  } else {
    const auto kernel = bn_kernels::grad_input_planar_kernel<scalar_t, acc_t, VEC, U>;
    kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
        xp, gp, dxp, p, mp, sp, hp, coef_dy.const_data_ptr<acc_t>(), coef_d.const_data_ptr<acc_t>(),
        coef_0.const_data_ptr<acc_t>(), relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ts_bn_forward_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, double eps, bool sigmoid_gate,
    bool relu) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::DeviceIndex device = x_in.device().index();
  const Input in = kernel_input(x_in, task_ids, num_tasks, "ts_batch_norm");
  const at::Tensor& x = in.x;
  const bool interleaved = in.interleaved;
  const int64_t N = in.N, C = in.C, S = in.S, T = num_tasks;
  const at::ScalarType acc = in.acc;
  const at::TensorOptions acc_options = x.options().dtype(acc);
  const Tasks& tasks = in.tasks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gate = gate_table(weight, T, C, acc, sigmoid_gate, x);
  const at::Tensor shift = acc_table(bias, T, C, acc, x, "bias");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean, var, invstd, count, scale;
  if (training) {
    TORCH_CHECK_VALUE(x.numel() > 0, "ts_batch_norm: cannot normalise an empty input when training");
    mean = at::empty({T, C}, acc_options);
    var = at::empty_like(mean);
    invstd = at::empty_like(mean);
    scale = at::empty_like(mean);
    count = at::empty({T}, acc_options);
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                          running_var->defined(),
                      "ts_batch_norm: eval needs running_mean and running_var");
    mean = acc_table(running_mean, T, C, acc, x, "running_mean").clone();
    var = acc_table(running_var, T, C, acc, x, "running_var").clone();
    invstd = (var + eps).rsqrt();
    count = at::zeros({T}, acc_options);
    scale = gate.defined() ? (gate * invstd).contiguous() : invstd;
  }
  if (x.numel() == 0) return {y, mean, invstd, var, count};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(interleaved, C, S, {xp, yp}), [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr int U = bn_kernels::tile_depth<scalar_t, VEC, 1>();
      if (training) {
        constexpr int US = bn_kernels::slab_depth<scalar_t, VEC, 1>();
        const auto kernel = bn_kernels::slab_forward_kernel<scalar_t, acc_t, VEC, US>;
        const SlabConfig slab = slab_config(reinterpret_cast<const void*>(kernel), N, C, S, T, interleaved, tasks,
                                            VEC, US, sizeof(scalar_t), 1, device);
        if (slab.use) {
          kernel<<<slab.plan.units, slab.plan.threads, slab.smem, stream>>>(
              xp, yp, slab.plan, eps, data_or_null<acc_t>(gate), data_or_null<acc_t>(shift), relu,
              mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), count.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      const Plan p = plan_for(N, C, S, interleaved, VEC, U, tasks, device);
      if (training)
        split_batch_stats<scalar_t, acc_t, VEC, U>(in, p, T, eps, gate, mean, var, invstd, scale, count, device,
                                                   stream);
      if (interleaved) {
        const auto kernel = bn_kernels::apply_interleaved_kernel<scalar_t, acc_t, VEC, U>;
        kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
            xp, yp, p, mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), data_or_null<acc_t>(shift),
            relu);
      } else {
        const auto kernel = bn_kernels::apply_planar_kernel<scalar_t, acc_t, VEC, U>;
        kernel<<<pass_grid(kernel, p, device), kThreads, 0, stream>>>(
            xp, yp, p, mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), data_or_null<acc_t>(shift),
            relu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, invstd, var, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ts_bn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, bool sigmoid_gate, bool relu) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::DeviceIndex device = x_in.device().index();
  const BackwardInputs in =
      backward_inputs(grad_y, x_in, weight, bias, mean_in, invstd_in, task_ids, num_tasks, sigmoid_gate);
  const at::Tensor& x = in.x;
  const int64_t N = in.N, C = in.C, S = in.S, T = num_tasks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor dx = at::empty_like(x);
  at::Tensor s1, s2;  // Σdy', Σdy'·(x − mean) per (task, channel), double
  if (x.numel() == 0) {
    s1 = at::zeros({T, C}, x.options().dtype(at::kDouble));
    s2 = at::zeros_like(s1);
  } else {
    s1 = at::empty({T, C}, x.options().dtype(at::kDouble));
    s2 = at::empty_like(s1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = in.dy.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      with_vec<scalar_t>(pick_vec<scalar_t>(in.interleaved, C, S, {xp, gp, dxp}), [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        constexpr int U = bn_kernels::tile_depth<scalar_t, VEC, 2>();
        {
          constexpr int US = bn_kernels::slab_depth<scalar_t, VEC, 2>();
          const auto kernel = bn_kernels::slab_backward_kernel<scalar_t, acc_t, VEC, US>;
          const SlabConfig slab = slab_config(reinterpret_cast<const void*>(kernel), N, C, S, T, in.interleaved,
                                              in.tasks, VEC, US, sizeof(scalar_t), 2, device);
          if (slab.use) {
            kernel<<<slab.plan.units, slab.plan.threads, slab.smem, stream>>>(
                xp, gp, dxp, slab.plan, in.mean.const_data_ptr<acc_t>(), in.scale.const_data_ptr<acc_t>(),
                data_or_null<acc_t>(in.shift), data_or_null<acc_t>(in.gate), in.invstd.const_data_ptr<acc_t>(), relu,
                training, s1.data_ptr<double>(), s2.data_ptr<double>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
        const at::Tensor coef_dy = at::empty({T, C}, x.options().dtype(in.acc));
        const at::Tensor coef_d = at::empty_like(coef_dy), coef_0 = at::empty_like(coef_dy);
        const Plan p = plan_for(N, C, S, in.interleaved, VEC, U, in.tasks, device);
        split_grad_sums<scalar_t, acc_t, VEC, U>(in, p, T, relu, training, s1, s2, coef_dy, coef_d, coef_0, device,
                                                 stream);
        split_grad_input<scalar_t, acc_t, VEC, U>(in, p, relu, coef_dy, coef_d, coef_0, dx, device, stream);
      });
    });
  }
  at::Tensor dweight = at::empty({0}, x.options());
  if (weight.has_value() && weight->defined()) {
    at::Tensor dw = s2 * in.invstd.to(at::kDouble);  // Σdy'·x̂
    if (sigmoid_gate) {
      const at::Tensor sg = weight->detach().to(at::kDouble).sigmoid();
      dw = dw * sg * (1 - sg);
    }
    dweight = dw.to(weight->scalar_type());
  }
  at::Tensor dbias = bias.has_value() && bias->defined() ? s1.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

// This process's (mean, biased var, element count) per (task, channel) in the accumulation type: the split
// path's statistics pass and merge (an absent task: 0, 0, 0; an empty x: all zeros).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ts_bn_batch_stats_cuda(const at::Tensor& x_in,
                                                                       const c10::optional<at::Tensor>& task_ids,
                                                                       int64_t num_tasks) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::DeviceIndex device = x_in.device().index();
  const Input in = kernel_input(x_in, task_ids, num_tasks, "ts_batch_norm");
  const at::Tensor& x = in.x;
  const int64_t T = num_tasks, C = in.C;
  const at::TensorOptions acc_options = x.options().dtype(in.acc);
  if (x.numel() == 0) {
    const at::Tensor zeros = at::zeros({T, C}, acc_options);
    return {zeros, zeros.clone(), at::zeros({T}, acc_options)};
  }
  const at::Tensor mean = at::empty({T, C}, acc_options), var = at::empty_like(mean);
  const at::Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean);  // not returned
  const at::Tensor count = at::empty({T}, acc_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_batch_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The forward's pack width (y is a fresh, aligned allocation there) and tile depth, so that the partitions,
    // and with them the statistics' bits, are the forward's.
    with_vec<scalar_t>(pick_vec<scalar_t>(in.interleaved, C, in.S, {x.const_data_ptr<scalar_t>()}), [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr int U = bn_kernels::tile_depth<scalar_t, VEC, 1>();
      const Plan p = plan_for(in.N, C, in.S, in.interleaved, VEC, U, in.tasks, device);
      split_batch_stats<scalar_t, acc_t, VEC, U>(in, p, T, /*eps (invstd is not returned)=*/1.0, at::Tensor(), mean,
                                                 var, invstd, scale, count, device, stream);
    });
  });
  return {mean, var, count};
}

// This process's s1 = Σ dy', s2 = Σ dy'·(x − mean) per (task, channel), in float64.
std::tuple<at::Tensor, at::Tensor> ts_bn_backward_reduce_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool sigmoid_gate, bool relu) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::DeviceIndex device = x_in.device().index();
  const BackwardInputs in = backward_inputs(grad_y, x_in, weight, bias, mean, invstd, task_ids, num_tasks,
                                            sigmoid_gate);
  const int64_t T = num_tasks, C = in.C;
  const at::TensorOptions double_options = in.x.options().dtype(at::kDouble);
  if (in.x.numel() == 0) return {at::zeros({T, C}, double_options), at::zeros({T, C}, double_options)};
  const at::Tensor s1 = at::empty({T, C}, double_options), s2 = at::empty_like(s1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "ts_bn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The backward's pack width rule (dx is a fresh, aligned allocation there), so that its partitions are the
    // backward's.
    const int vec = pick_vec<scalar_t>(in.interleaved, C, in.S,
                                       {in.x.const_data_ptr<scalar_t>(), in.dy.const_data_ptr<scalar_t>()});
    with_vec<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr int U = bn_kernels::tile_depth<scalar_t, VEC, 2>();
      const Plan p = plan_for(in.N, C, in.S, in.interleaved, VEC, U, in.tasks, device);
      const at::Tensor coef_dy = at::empty({T, C}, in.x.options().dtype(in.acc));  // not returned
      const at::Tensor coef_d = at::empty_like(coef_dy), coef_0 = at::empty_like(coef_dy);
      split_grad_sums<scalar_t, acc_t, VEC, U>(in, p, T, relu, /*training=*/true, s1, s2, coef_dy, coef_d, coef_0,
                                               device, stream);
    });
  });
  return {s1, s2};
}

// dx of the training backward from sums and counts given from outside (every process's): the dx coefficients
// from them, then the split path's dx pass.
at::Tensor ts_bn_backward_elemt_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
                                     const at::Tensor& sum_dy_xmu, const at::Tensor& count,
                                     const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool sigmoid_gate,
                                     bool relu) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::DeviceIndex device = x_in.device().index();
  const BackwardInputs in = backward_inputs(grad_y, x_in, weight, bias, mean, invstd, task_ids, num_tasks,
                                            sigmoid_gate);
  const int64_t T = num_tasks, C = in.C;
  check_table_shape(sum_dy, T, C, "ts_batch_norm backward", "sum_dy");
  check_table_shape(sum_dy_xmu, T, C, "ts_batch_norm backward", "sum_dy_xmu");
  check_count_shape(count, T, "ts_batch_norm backward");
  for (const at::Tensor* t : {&sum_dy, &sum_dy_xmu, &count})
    TORCH_CHECK_VALUE(t->device() == in.x.device(), "ts_batch_norm backward: the sums and counts must be on ",
                      in.x.device(), ", got ", t->device());
  const at::Tensor s1 = sum_dy.to(at::kDouble).contiguous(), s2 = sum_dy_xmu.to(at::kDouble).contiguous();
  const at::Tensor m = count.to(at::kDouble).contiguous();
  at::Tensor dx = at::empty_like(in.x);
  if (in.x.numel() == 0) return dx;
  TORCH_CHECK(T * C <= std::numeric_limits<int32_t>::max(), "ts_batch_norm: num_tasks · channels too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "ts_bn_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor coef_dy = at::empty({T, C}, in.x.options().dtype(in.acc));
    const at::Tensor coef_d = at::empty_like(coef_dy), coef_0 = at::empty_like(coef_dy);
    const int units = static_cast<int>(T * C);
    bn_kernels::dx_coefficients_kernel<acc_t>
        <<<(units + bn_kernels::kCoefficientThreads - 1) / bn_kernels::kCoefficientThreads,
           bn_kernels::kCoefficientThreads, 0, stream>>>(
            s1.const_data_ptr<double>(), s2.const_data_ptr<double>(), m.const_data_ptr<double>(),
            data_or_null<acc_t>(in.gate), in.invstd.const_data_ptr<acc_t>(), static_cast<int>(C), units,
            coef_dy.data_ptr<acc_t>(), coef_d.data_ptr<acc_t>(), coef_0.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(in.interleaved, C, in.S, {xp, in.dy.const_data_ptr<scalar_t>(),
                                                                     dx.const_data_ptr<scalar_t>()}),
                       [&](auto vec_tag) {
                         constexpr int VEC = decltype(vec_tag)::value;
                         constexpr int U = bn_kernels::tile_depth<scalar_t, VEC, 2>();
                         const Plan p = plan_for(in.N, C, in.S, in.interleaved, VEC, U, in.tasks, device);
                         split_grad_input<scalar_t, acc_t, VEC, U>(in, p, relu, coef_dy, coef_d, coef_0, dx, device,
                                                                   stream);
                       });
  });
  return dx;
}

// Which path ts_bn_forward (backward=false: the training forward) or ts_bn_backward takes for x under the
// current TSBN_CUDA_SLAB: "slab:<threads>x<resident blocks per SM>", "split" or "interleaved". The pack width
// is chosen from x alone (the outputs, and dy when it is dense, are fresh 16-byte aligned allocations). For
// tests and benchmarks.
std::string ts_bn_cuda_path(const at::Tensor& x_in, const c10::optional<at::Tensor>& task_ids, int64_t num_tasks,
                            bool backward) {
  TORCH_CHECK_VALUE(x_in.is_cuda(), "ts_bn_cuda_path: x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::DeviceIndex device = x_in.device().index();
  const Input in = kernel_input(x_in, task_ids, num_tasks, "ts_bn_cuda_path");
  if (in.interleaved) return "interleaved";
  const at::Tensor& x = in.x;
  const int64_t N = in.N, C = in.C, S = in.S;
  const Tasks& tasks = in.tasks;
  std::string path = "split";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_cuda_path", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vec<scalar_t>(pick_vec<scalar_t>(false, C, S, {x.const_data_ptr<scalar_t>()}), [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr int U1 = bn_kernels::slab_depth<scalar_t, VEC, 1>(), U2 = bn_kernels::slab_depth<scalar_t, VEC, 2>();
      const void* kernel =
          backward ? reinterpret_cast<const void*>(bn_kernels::slab_backward_kernel<scalar_t, acc_t, VEC, U2>)
                   : reinterpret_cast<const void*>(bn_kernels::slab_forward_kernel<scalar_t, acc_t, VEC, U1>);
      const SlabConfig slab = slab_config(kernel, N, C, S, num_tasks, false, tasks, VEC, backward ? U2 : U1,
                                          sizeof(scalar_t), backward ? 2 : 1, device);
      if (slab.use) path = "slab:" + std::to_string(slab.plan.threads) + "x" + std::to_string(slab.blocks_per_sm);
    });
  });
  return path;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tsbn, m) {
  m.def("ts_bn_cuda_path(Tensor x, Tensor? task_ids, int num_tasks, bool backward) -> str", &ts_bn_cuda_path);
}

TORCH_LIBRARY_IMPL(tsbn, CUDA, m) {
  m.impl("ts_bn_forward", &ts_bn_forward_cuda);
  m.impl("ts_bn_backward", &ts_bn_backward_cuda);
  m.impl("ts_bn_batch_stats", &ts_bn_batch_stats_cuda);
  m.impl("ts_bn_backward_reduce", &ts_bn_backward_reduce_cuda);
  m.impl("ts_bn_backward_elemt", &ts_bn_backward_elemt_cuda);
}

}  // namespace tsbn
