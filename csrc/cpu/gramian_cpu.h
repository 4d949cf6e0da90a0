// The CPU kernels of gramian and combine, built for the baseline ISA (gramian_cpu.cpp), for AVX2 + FMA
// (gramian_cpu_avx2.cpp) and for AVX-512 (gramian_cpu_avx512.cpp); cpu_isa.h says how one is chosen.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_isa.h"

namespace tsbn {

struct CpuGramianKernels {
  at::Tensor (*gramian)(const at::Tensor& G);                      // G·Gᵀ, [T, T]
  at::Tensor (*combine)(const at::Tensor& G, const at::Tensor& w);  // wᵀ·G, [P]
};

extern const CpuGramianKernels kBaselineCpuGramianKernels;
#if TSBN_CPU_HAS_AVX2
extern const CpuGramianKernels kAvx2CpuGramianKernels;
extern const CpuGramianKernels kAvx512CpuGramianKernels;
#endif

}  // namespace tsbn
