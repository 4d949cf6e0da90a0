// Operator schemas of the `tsbn` namespace. Kernels for each dispatch key live in cpu/ and cuda/, one file
// per op and backend; autograd and fake (meta) implementations are registered from Python
// (tsbn_kernels/_extension.py and the kernel modules), as pytorch/extension-cpp does.
#include <torch/library.h>

#include <string>

#include "cpu/cpu_isa.h"

namespace tsbn {

bool built_with_cuda() {
#ifdef TSBN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_kernels_isa() { return cpu_isa(); }

TORCH_LIBRARY(tsbn, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // Which build of the C++ CPU kernels runs on this CPU: "baseline", "avx2" or "avx512" (cpu/cpu_isa.h).
  m.def("cpu_isa() -> str", &cpu_kernels_isa);
  // [T + 2] int64: ids below 0, then the number of samples of each task, then ids >= num_tasks.
  // One pass, no device-side assert: callers decide how to report out-of-range ids.
  m.def("task_counts(Tensor task_ids, int num_tasks) -> Tensor");
}

}  // namespace tsbn
