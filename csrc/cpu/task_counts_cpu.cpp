#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

namespace tsbn {
namespace {

at::Tensor task_counts_cpu(const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK_VALUE(task_ids.dim() == 1, "task_counts: task_ids must be 1-D, got ", task_ids.dim(), "-D");
  TORCH_CHECK_VALUE(num_tasks >= 1, "task_counts: num_tasks must be >= 1, got ", num_tasks);
  TORCH_CHECK_TYPE(at::isIntegralType(task_ids.scalar_type(), /*includeBool=*/false),
                   "task_counts: task_ids must be an integer tensor, got ", task_ids.scalar_type());
  const at::Tensor ids = task_ids.contiguous();
  const int64_t n = ids.numel();
  const int64_t bins = num_tasks + 2;
  at::Tensor out = at::zeros({bins}, ids.options().dtype(at::kLong));
  // Per-chunk histograms merged in chunk order: integer sums, so the result is exact and deterministic.
  const int64_t grain = 1 << 16;
  const int64_t chunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<int64_t> partial(chunks * bins, 0);
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "task_counts_cpu", [&] {
    const scalar_t* data = ids.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t* hist = partial.data() + c * bins;
        const int64_t stop = std::min(n, (c + 1) * grain);
        for (int64_t i = c * grain; i < stop; ++i) {
          const int64_t v = static_cast<int64_t>(data[i]);
          hist[v < 0 ? 0 : (v >= num_tasks ? bins - 1 : v + 1)] += 1;
        }
      }
    });
  });
  int64_t* result = out.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t b = 0; b < bins; ++b) result[b] += partial[c * bins + b];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tsbn, CPU, m) { m.impl("task_counts", &task_counts_cpu); }

}  // namespace tsbn
