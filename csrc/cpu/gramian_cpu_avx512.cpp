// The kernels of gramian_cpu.cpp built a third time, for AVX-512 (F, BW, VL, DQ) + FMA: 16-wide fp32 loops. Chosen
// at load time where torch's CPU capability is AVX512 (cpu_isa.h).
#include "gramian_cpu.h"

#if TSBN_CPU_HAS_AVX512
#define TSBN_CPU_AVX512
#include "gramian_cpu.cpp"
#endif
