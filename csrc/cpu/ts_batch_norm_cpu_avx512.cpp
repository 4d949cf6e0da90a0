// The kernels of ts_batch_norm_cpu.cpp built a third time, for AVX-512 (F, BW, VL, DQ) + FMA: 16-wide fp32 loops.
// Chosen at load time where torch's CPU capability is AVX512 (cpu_isa.h).
#include "ts_batch_norm_cpu.h"

#if TSBN_CPU_HAS_AVX512
#define TSBN_CPU_AVX512
#include "ts_batch_norm_cpu.cpp"
#endif
