// Small CUDA helpers shared by the .cu files. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h,
// which pulls in cuBLAS/cuSPARSE headers): the sources then compile wherever nvcc and torch's headers are,
// including the GPU-less CI machine that checks every .cu file with nvcc.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <array>

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

}  // namespace tsbn
