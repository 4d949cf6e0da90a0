// The CPU kernels of ts_batch_norm, built for the baseline ISA (ts_batch_norm_cpu.cpp), for AVX2 + FMA
// (ts_batch_norm_cpu_avx2.cpp) and for AVX-512 (ts_batch_norm_cpu_avx512.cpp); cpu_isa.h says how one is chosen.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "cpu_isa.h"

namespace tsbn {

struct CpuBatchNormKernels {
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
  // The passes of the cross-process path (the ts_bn_batch_stats, ts_bn_backward_reduce and ts_bn_backward_elemt
  // schemas).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*batch_stats)(const at::Tensor& x,
                                                                const c10::optional<at::Tensor>& task_ids,
                                                                int64_t num_tasks);
  std::tuple<at::Tensor, at::Tensor> (*backward_reduce)(
      const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
      const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool sigmoid_gate, bool relu);
  at::Tensor (*backward_elemt)(const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                               const at::Tensor& invstd, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                               const at::Tensor& count, const c10::optional<at::Tensor>& task_ids,
                               int64_t num_tasks, bool sigmoid_gate, bool relu);
};

extern const CpuBatchNormKernels kBaselineCpuKernels;
#if TSBN_CPU_HAS_AVX2
extern const CpuBatchNormKernels kAvx2CpuKernels;
extern const CpuBatchNormKernels kAvx512CpuKernels;
#endif

}  // namespace tsbn
