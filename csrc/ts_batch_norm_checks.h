// Shape checks of the per-(task, channel) tables and per-task counts that the batch-norm ops take, shared by the
// CPU and CUDA kernels so that both refuse the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace tsbn {

// `what` names the op in the message ("ts_batch_norm backward"), `name` the argument.
inline void check_table_shape(const at::Tensor& t, int64_t T, int64_t C, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == T && t.size(1) == C, what, ": ", name, " must have shape (", T,
                    ", ", C, "), got ", t.sizes());
}

inline void check_count_shape(const at::Tensor& count, int64_t T, const char* what) {
  TORCH_CHECK_VALUE(count.dim() == 1 && count.size(0) == T, what, ": count must have shape (", T, ",), got ",
                    count.sizes());
}

}  // namespace tsbn
