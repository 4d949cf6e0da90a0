// The C++ CPU kernels are compiled once per instruction set and one build is chosen when the library loads, as
// PyTorch's own CPU kernels are (ATen compiles them per CPU_CAPABILITY and picks one at run time). A kernel file
// X_cpu.cpp is built for the baseline ISA and registers its ops with the build chosen for this CPU; X_cpu_avx2.cpp
// and X_cpu_avx512.cpp define TSBN_CPU_AVX2 or TSBN_CPU_AVX512 and include X_cpu.cpp, which builds the same source
// for AVX2 + FMA or for AVX-512 (F, BW, VL, DQ) + FMA (GCC on x86-64).
// The choice follows torch's CPU capability (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY):
// AVX512 there selects the AVX-512 builds, AVX2 the AVX2 builds, anything else the baseline.
#pragma once

#include <ATen/Version.h>

#include <string>

// GCC on x86-64 builds the AVX2 and AVX-512 variants; elsewhere only the baseline exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TSBN_CPU_HAS_AVX2 1
#else
#define TSBN_CPU_HAS_AVX2 0
#endif
#define TSBN_CPU_HAS_AVX512 TSBN_CPU_HAS_AVX2

// A kernel file built for a wider ISA (its *_avx2.cpp / *_avx512.cpp defines TSBN_CPU_AVX2 / TSBN_CPU_AVX512, then
// includes it) wraps its own code in TSBN_CPU_ISA_BEGIN / TSBN_CPU_ISA_END, after every #include: the target then
// applies to that code only. Inline functions of torch's and the standard headers stay baseline code in every
// object, so the linker cannot hand a wider copy of one to a baseline caller.
#define TSBN_CPU_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define TSBN_CPU_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma\")")
#define TSBN_CPU_ISA_END _Pragma("GCC pop_options")

namespace tsbn {

enum class CpuIsa { baseline, avx2, avx512 };

// The build that runs on this CPU; decided once (torch reads ATEN_CPU_CAPABILITY once too). The CPUID checks
// guard against a capability string that promises more than this CPU has.
inline CpuIsa cpu_isa_level() {
#if TSBN_CPU_HAS_AVX2
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (capability == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return CpuIsa::avx512;
    if ((capability == "AVX2" || capability == "AVX512") && avx2) return CpuIsa::avx2;
    return CpuIsa::baseline;
  }();
  return isa;
#else
  return CpuIsa::baseline;
#endif
}

inline const char* cpu_isa() {
  switch (cpu_isa_level()) {
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace tsbn

// The kernel table (a kernel file's struct of function pointers) of the build that runs on this CPU. A macro, so
// that the wider tables are not named where they are not built.
#if TSBN_CPU_HAS_AVX2
#define TSBN_CPU_KERNELS_FOR_THIS_CPU(baseline_table, avx2_table, avx512_table)           \
  (::tsbn::cpu_isa_level() == ::tsbn::CpuIsa::avx512 ? (avx512_table)                    \
   : ::tsbn::cpu_isa_level() == ::tsbn::CpuIsa::avx2 ? (avx2_table) : (baseline_table))
#else
#define TSBN_CPU_KERNELS_FOR_THIS_CPU(baseline_table, avx2_table, avx512_table) (baseline_table)
#endif
