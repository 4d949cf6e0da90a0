// Schemas of the fused task-specific batch norm ops. Kernels: cpu/ts_batch_norm_cpu.cpp,
// cuda/ts_batch_norm_cuda.cu; fake impls and autograd: tsbn_kernels/kernels/cpp_ts_batch_norm.py.
#include <torch/library.h>
#include <torch/types.h>

TORCH_LIBRARY_FRAGMENT(tsbn, m) {
  // Functional forward. training: batch statistics of each task; otherwise the running statistics.
  // Returns y (x's dtype and memory format) and, per (task, channel) in the accumulation dtype, the mean,
  // the inverse std and the biased variance used, plus the element count m_t of each task (0 for absent
  // tasks; all zeros in eval).
  m.def(
      "ts_bn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? task_ids, int num_tasks, bool training, float eps, bool sigmoid_gate, bool relu) "
      "-> (Tensor y, Tensor mean, Tensor invstd, Tensor var, Tensor count)");
  // Gradients of ts_bn_forward. dweight/dbias are empty tensors when weight/bias are absent.
  m.def(
      "ts_bn_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor? task_ids, int num_tasks, bool training, bool sigmoid_gate, bool relu) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The passes of the cross-process path (tsbn_kernels/sync_batch_norm.py), which runs collectives on the
  // [T, C] results between them: this process's mean, biased variance and element count per task (the
  // accumulation dtype); its gradient sums Σ dy' and Σ dy'·(x − mean) (dy' is dy through the recomputed relu;
  // float64 on the CPU); and dx from the sums and counts of every process.
  m.def("ts_bn_batch_stats(Tensor x, Tensor? task_ids, int num_tasks) -> (Tensor mean, Tensor var, Tensor count)");
  m.def(
      "ts_bn_backward_reduce(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor? task_ids, int num_tasks, bool sigmoid_gate, bool relu) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "ts_bn_backward_elemt(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor sum_dy, Tensor sum_dy_xmu, Tensor count, Tensor? task_ids, int num_tasks, bool sigmoid_gate, "
      "bool relu) -> Tensor grad_x");
  // running ← (1 − f_t)·running + f_t·stat for every task with count > 0, with the unbiased variance;
  // f_t = momentum_per_task[t] when given (cumulative average), else momentum.
  m.def(
      "ts_bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "Tensor count, float momentum, Tensor? momentum_per_task) -> ()");
}

namespace tsbn {
namespace {

// [T, C] tensor arithmetic in double, the same on every device and without a host sync: absent tasks get
// factor 0 and stay untouched. Negligible next to the passes over x, so one device-generic kernel serves all.
void ts_bn_update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& count, double momentum,
                                const c10::optional<at::Tensor>& momentum_per_task) {
  TORCH_CHECK_VALUE(running_mean.dim() == 2 && running_var.sizes() == running_mean.sizes() &&
                        mean.sizes() == running_mean.sizes() && var.sizes() == running_mean.sizes() &&
                        count.dim() == 1 && count.size(0) == running_mean.size(0),
                    "ts_bn_update_running_stats: running stats, mean and var must be [T, C] and count [T]");
  const at::Tensor n = count.to(at::kDouble);
  at::Tensor f = momentum_per_task.has_value() && momentum_per_task->defined()
                     ? momentum_per_task->to(n.options())
                     : at::full_like(n, momentum);
  f = at::where(n > 0, f, at::zeros_like(f)).unsqueeze(1);
  const at::Tensor unbiased = var.to(at::kDouble) * (n / (n - 1).clamp_min(1)).unsqueeze(1);
  running_mean.copy_(running_mean.to(at::kDouble).lerp(mean.to(at::kDouble), f));
  running_var.copy_(running_var.to(at::kDouble).lerp(unbiased, f));
}

}  // namespace

TORCH_LIBRARY_IMPL(tsbn, CompositeExplicitAutograd, m) {
  m.impl("ts_bn_update_running_stats", &ts_bn_update_running_stats);
}

}  // namespace tsbn
