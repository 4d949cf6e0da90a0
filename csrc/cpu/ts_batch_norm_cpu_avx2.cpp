// The CPU kernels of ts_batch_norm_cpu.cpp built a second time, for AVX2 + FMA: 8-wide fp32 loops, and the bf16
// conversions (a shift on the way in, round-to-nearest-even on the way out) in 256-bit integer ops. Chosen at
// load time where torch's CPU capability is AVX2 (cpu_isa.h).
#include "ts_batch_norm_cpu.h"

#if TSBN_CPU_HAS_AVX2
#define TSBN_CPU_AVX2
#include "ts_batch_norm_cpu.cpp"
#endif
