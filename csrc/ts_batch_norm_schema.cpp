// Schemas of the fused task-specific batch norm ops. Kernels: cpu/ts_batch_norm_cpu.cpp,
// cuda/ts_batch_norm_cuda.cu; fake impls and autograd: tsbn_kernels/kernels/cpp_ts_batch_norm.py.
#include <torch/library.h>

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
  // running ← (1 − f_t)·running + f_t·stat for every task with count > 0, with the unbiased variance;
  // f_t = momentum_per_task[t] when given (cumulative average), else momentum.
  m.def(
      "ts_bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "Tensor count, float momentum, Tensor? momentum_per_task) -> ()");
}
