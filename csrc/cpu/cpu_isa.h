// The C++ CPU kernels are compiled once per instruction set and one build is chosen when the library loads, as
// PyTorch's own CPU kernels are (ATen compiles them per CPU_CAPABILITY and picks one at run time). A kernel file
// X_cpu.cpp is built for the baseline ISA and registers its ops with the build chosen for this CPU; X_cpu_avx2.cpp
// defines TSBN_CPU_AVX2 and includes X_cpu.cpp, which builds the same source for AVX2 + FMA (GCC on x86-64).
// The choice follows torch's CPU capability (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY):
// AVX2 or AVX512 there selects the AVX2 builds, anything else the baseline.
#pragma once

#include <ATen/Version.h>

#include <string>

// GCC on x86-64 builds the AVX2 variants; elsewhere only the baseline exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TSBN_CPU_HAS_AVX2 1
#else
#define TSBN_CPU_HAS_AVX2 0
#endif

// A kernel file built for AVX2 (its *_avx2.cpp defines TSBN_CPU_AVX2, then includes it) wraps its own code in
// TSBN_CPU_AVX2_BEGIN / TSBN_CPU_AVX2_END, after every #include: the target then applies to that code only.
// Inline functions of torch's and the standard headers stay baseline code in every object, so the linker
// cannot hand an AVX2 copy of one to a baseline caller.
#define TSBN_CPU_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define TSBN_CPU_AVX2_END _Pragma("GCC pop_options")

namespace tsbn {

// Whether the AVX2 builds run on this CPU; decided once (torch reads ATEN_CPU_CAPABILITY once too). The CPUID
// check guards against a capability string that promises more than this CPU has.
inline bool cpu_runs_avx2() {
#if TSBN_CPU_HAS_AVX2
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

inline const char* cpu_isa() { return cpu_runs_avx2() ? "avx2" : "baseline"; }

}  // namespace tsbn

// The kernel table (a kernel file's struct of function pointers) of the build that runs on this CPU. A macro, so
// that the AVX2 table is not named where it is not built.
#if TSBN_CPU_HAS_AVX2
#define TSBN_CPU_KERNELS_FOR_THIS_CPU(baseline, avx2) (::tsbn::cpu_runs_avx2() ? (avx2) : (baseline))
#else
#define TSBN_CPU_KERNELS_FOR_THIS_CPU(baseline, avx2) (baseline)
#endif
