// Small CUDA helpers shared by the .cu files. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h,
// which pulls in cuBLAS/cuSPARSE headers): the sources then compile wherever nvcc and torch's headers are,
// including the GPU-less CI machine that checks every .cu file with nvcc.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <array>
#include <map>
#include <mutex>

namespace tsbn {

// Streaming multiprocessors of a device, queried once per device.
inline int sm_count(c10::DeviceIndex device) {
  static std::array<int, 64> cache{};
  int& cached = cache.at(static_cast<size_t>(device));
  if (cached == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cached = count;
  }
  return cached;
}

// Results of CUDA queries that are fixed per key (kernel, device, launch shape): computed once under a lock,
// then looked up on every launch. `compute` runs with the lock held, so concurrent first calls query once.
template <typename Key, typename Value>
class QueryCache {
 public:
  template <typename Compute>
  Value get(const Key& key, Compute compute) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = values_.find(key);
    if (found != values_.end()) return found->second;
    return values_.emplace(key, compute()).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<Key, Value> values_;
};

}  // namespace tsbn
