// Per-(task, channel) formulas that the CPU and the CUDA kernels of the batch norm share, compiled by g++ and nvcc
// alike, so that every backend and path computes them with the same operations in the same order: from the same
// sums they give the same bits.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TSBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TSBN_HOST_DEVICE inline
#endif

namespace tsbn {

// dx = dy·dy' + d·(x − mean) + zero per (task, channel), dy' the output gradient after the relu mask.
template <typename acc_t>
struct DxCoefficients {
  acc_t dy, d, zero;
};

// The coefficients of (task, channel) k from the double sums s1 = Σ dy', s2 = Σ dy'·(x − mean) over the task's m
// values: with x̂ = r·(x − mean) and Σ dy'·x̂ = r·s2, dx = a·r·(dy' − s1/m − x̂·r·s2/m), so dy = a·r,
// d = −a·r·r·(r·s2)/m, zero = −a·r·s1/m (both 0 in eval); a = gate[k] (1 where gate is null), r = invstd[k].
// A task without values has s1 = s2 = 0 and m = 0; it is divided by 1 instead.
template <typename acc_t>
TSBN_HOST_DEVICE DxCoefficients<acc_t> dx_coefficients(const acc_t* __restrict__ gate, const acc_t* __restrict__ invstd,
                                                        int64_t k, double s1, double s2, double m, bool training) {
  const double r = static_cast<double>(invstd[k]);
  const double ar = (gate != nullptr ? static_cast<double>(gate[k]) : 1.0) * r;
  const double mm = m > 1.0 ? m : 1.0;
  return {static_cast<acc_t>(ar), training ? static_cast<acc_t>(-ar * r * (s2 * r) / mm) : acc_t(0),
          training ? static_cast<acc_t>(-ar * s1 / mm) : acc_t(0)};
}

}  // namespace tsbn
