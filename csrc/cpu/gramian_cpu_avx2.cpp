// The kernels of gramian_cpu.cpp built a second time, for AVX2 + FMA: 8-wide fp32 register blocks with fused
// multiply-adds. Chosen at load time where torch's CPU capability is AVX2 (cpu_isa.h).
#include "gramian_cpu.h"

#if TSBN_CPU_HAS_AVX2
#define TSBN_CPU_AVX2
#include "gramian_cpu.cpp"
#endif
