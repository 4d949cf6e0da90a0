#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cuda_utils.cuh"

namespace tsbn {
namespace {

// Block-local histogram in shared memory, then one global add per bin. Integer atomics are exact, so the
// counts are deterministic; out-of-range ids land in the first and last bins instead of asserting.
template <typename index_t>
__global__ void task_counts_kernel(const index_t* __restrict__ ids, int64_t n, int64_t num_tasks,
                                   unsigned long long* __restrict__ out) {
  extern __shared__ unsigned int hist[];
  const int64_t bins = num_tasks + 2;
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    atomicAdd(&hist[v < 0 ? 0 : (v >= num_tasks ? bins - 1 : v + 1)], 1u);
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x)
    if (hist[b]) atomicAdd(&out[b], static_cast<unsigned long long>(hist[b]));
}

at::Tensor task_counts_cuda(const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK_VALUE(task_ids.dim() == 1, "task_counts: task_ids must be 1-D, got ", task_ids.dim(), "-D");
  TORCH_CHECK_VALUE(num_tasks >= 1, "task_counts: num_tasks must be >= 1, got ", num_tasks);
  TORCH_CHECK_TYPE(at::isIntegralType(task_ids.scalar_type(), /*includeBool=*/false),
                   "task_counts: task_ids must be an integer tensor, got ", task_ids.scalar_type());
  const size_t shared = (num_tasks + 2) * sizeof(unsigned int);
  TORCH_CHECK_VALUE(shared <= 48 * 1024, "task_counts: num_tasks=", num_tasks, " is too large");
  const c10::cuda::CUDAGuard guard(task_ids.device());
  const at::Tensor ids = task_ids.contiguous();
  at::Tensor out = at::zeros({num_tasks + 2}, ids.options().dtype(at::kLong));
  const int64_t n = ids.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int sms = sm_count(task_ids.device().index());
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4LL * sms));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "task_counts_cuda", [&] {
    task_counts_kernel<scalar_t><<<blocks, threads, shared, stream>>>(
        ids.const_data_ptr<scalar_t>(), n, num_tasks,
        reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tsbn, CUDA, m) { m.impl("task_counts", &task_counts_cuda); }

}  // namespace tsbn
