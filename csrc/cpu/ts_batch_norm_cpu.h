// The CPU kernels of ts_batch_norm, compiled once per instruction set and chosen when the library loads, as
// PyTorch's own CPU kernels are (ATen compiles them per CPU_CAPABILITY and picks one at run time):
// ts_batch_norm_cpu.cpp holds the kernels, builds them for the baseline ISA and registers the ops;
// ts_batch_norm_cpu_avx2.cpp builds the same source again for AVX2 + FMA (GCC on x86-64). The choice follows
// torch's CPU capability (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY): AVX2 or AVX512 there
// selects the AVX2 build, anything else the baseline.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

// GCC on x86-64 builds the AVX2 variant; elsewhere only the baseline exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TSBN_CPU_HAS_AVX2 1
#else
#define TSBN_CPU_HAS_AVX2 0
#endif

namespace tsbn {

struct CpuBatchNormKernels {
  const char* isa;  // "baseline" or "avx2"
  // y, mean, invstd, var, count (the ts_bn_forward schema).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*forward)(
      const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
      const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
      const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, double eps, bool sigmoid_gate,
      bool relu);
  // dx, dweight, dbias (the ts_bn_backward schema).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*backward)(
      const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
      const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, bool sigmoid_gate, bool relu);
  // The planar path a training call takes ("slab:G", "split" or "interleaved"), for tests and tuning.
  std::string (*path)(const at::Tensor& x, const c10::optional<at::Tensor>& task_ids, int64_t num_tasks,
                      bool backward);
};

extern const CpuBatchNormKernels kBaselineCpuKernels;
#if TSBN_CPU_HAS_AVX2
extern const CpuBatchNormKernels kAvx2CpuKernels;
#endif

}  // namespace tsbn
