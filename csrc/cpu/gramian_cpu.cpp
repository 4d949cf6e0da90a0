// Gramian G·Gᵀ and combination wᵀG of per-task gradients G [T, P] on the CPU, each in one pass over G.
//
// P is cut into fixed chunks of columns. A chunk's T rows are widened (fp16/bf16 to fp32) into a zero-padded
// buffer that stays in L2, and its T(T+1)/2 dot products run as register blocks of 2 × 4 rows: 8 vector
// accumulators share each column step's row loads and hide the add latency (one dot product at a time was
// add-latency bound and left T = 40 at a third of a BLAS matmul; the blocks beat per-chunk BLAS at every T
// measured, though at T = 40 the pass is still bound by the dot products rather than by memory, see
// benchmarks/RESULTS.md). Accumulation is fp32 within a chunk (fp64 for fp64 input); chunk partials are
// summed in double in a fixed order (fixed groups of chunks, then the groups in order), so the result does not
// depend on the thread count. Built per ISA (cpu_isa.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "gramian_cpu.h"

#if defined(TSBN_CPU_AVX512)
TSBN_CPU_AVX512_BEGIN
#elif defined(TSBN_CPU_AVX2)
TSBN_CPU_AVX2_BEGIN
#endif

namespace tsbn {
namespace {

constexpr int64_t kColumns = 2048;            // a chunk's T rows stay in L2 while its dot products run
constexpr int64_t kMinChunksPerGroup = 16;    // chunks summed into one partial, in order
constexpr int64_t kMaxGroups = 1024;          // bounds the [groups, T, T] partials for huge P
// Register block of dot products: kBlockRows·kBlockCols accumulators and as many row vectors as the block has
// sides. AVX-512 has 32 vector registers (16 elsewhere), room for a 4 × 4 block, which halves the loads per
// multiply-add of the 2 × 4 one.
#if defined(TSBN_CPU_AVX512)
constexpr int kBlockRows = 4, kBlockCols = 4;
#else
constexpr int kBlockRows = 2, kBlockCols = 4;
#endif

#if defined(TSBN_CPU_AVX512)
constexpr int kVectorBytes = 64;
#elif defined(TSBN_CPU_AVX2)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename acc_t>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

// Calls f(std::integral_constant<int, n>{}) with n = count, 1 <= count <= N: a block size known only at run time
// becomes a template argument, so that the loops over the block unroll completely.
template <int N, typename F>
void with_count(int count, F&& f) {
  if constexpr (N > 1) {
    if (count < N) return with_count<N - 1>(count, std::forward<F>(f));
  }
  f(std::integral_constant<int, N>{});
}

template <typename acc_t>
constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(acc_t));

void check_matrix(const at::Tensor& G, const char* op) {
  TORCH_CHECK_VALUE(G.dim() == 2, op, ": G must be 2-D [T, P], got ", G.dim(), "-D");
  TORCH_CHECK_VALUE(G.size(0) >= 1 && G.size(1) >= 1, op, ": G must have T >= 1 rows and P >= 1 columns, got ",
                    G.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(G.scalar_type()), op, ": G must be floating point, got ", G.scalar_type());
  TORCH_CHECK_VALUE(G.device().is_cpu(), op, ": G must be on the CPU");
}

template <typename acc_t>
inline typename VectorOf<acc_t>::type load_vector(const acc_t* p) {
  typename VectorOf<acc_t>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Dot products of rows i0..i0+I-1 with rows j0..j0+J-1 of a chunk buffer ([rows, kColumns], zero-padded to a
// whole number of vectors), added in double to out [T, T]. The loops over the block unroll completely, so the
// I·J accumulators live in registers for the whole chunk.
template <typename acc_t, int I, int J>
void dot_block(const acc_t* rows, int64_t i0, int64_t j0, int64_t padded, int64_t T, double* out) {
  using V = typename VectorOf<acc_t>::type;
  V acc[I][J];
  _Pragma("GCC unroll 8") for (int i = 0; i < I; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < J; ++j) acc[i][j] = V{};
  for (int64_t k = 0; k < padded; k += kLanes<acc_t>) {
    V a[I], b[J];
    _Pragma("GCC unroll 8") for (int i = 0; i < I; ++i) a[i] = load_vector(rows + (i0 + i) * kColumns + k);
    _Pragma("GCC unroll 8") for (int j = 0; j < J; ++j) b[j] = load_vector(rows + (j0 + j) * kColumns + k);
    _Pragma("GCC unroll 8") for (int i = 0; i < I; ++i)
      _Pragma("GCC unroll 8") for (int j = 0; j < J; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < I; ++i)
    for (int j = 0; j < J && j0 + j <= i0 + i; ++j) {
      acc_t dot = 0;
      for (int64_t lane = 0; lane < kLanes<acc_t>; ++lane) dot += acc[i][j][lane];
      out[(i0 + i) * T + j0 + j] += dot;
    }
}

// The lower triangle of one chunk's Gramian, added to out [T, T].
template <typename acc_t>
void chunk_gramian(const acc_t* rows, int64_t T, int64_t padded, double* out) {
  for (int64_t i0 = 0; i0 < T; i0 += kBlockRows) {
    const int I = static_cast<int>(std::min<int64_t>(kBlockRows, T - i0));
    for (int64_t j0 = 0; j0 < i0 + I; j0 += kBlockCols) {
      const int J = static_cast<int>(std::min<int64_t>(kBlockCols, i0 + I - j0));
      with_count<kBlockRows>(I, [&](auto i) {
        with_count<kBlockCols>(J, [&](auto j) {
          dot_block<acc_t, decltype(i)::value, decltype(j)::value>(rows, i0, j0, padded, T, out);
        });
      });
    }
  }
}

at::Tensor gramian_cpu(const at::Tensor& G_in) {
  check_matrix(G_in, "gramian");
  const at::Tensor G = G_in.contiguous();
  const int64_t T = G.size(0), P = G.size(1);
  const int64_t chunks = (P + kColumns - 1) / kColumns;
  // Groups depend on P only: the same partials and the same order of sums at any thread count.
  const int64_t per_group = std::max(kMinChunksPerGroup, (chunks + kMaxGroups - 1) / kMaxGroups);
  const int64_t groups = (chunks + per_group - 1) / per_group;
  const at::ScalarType acc_type = G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Scratch from torch's allocator, as ATen's: the profiler's memory events count it (up to 13 MB at T = 40).
  const at::Tensor partial_buffer = at::zeros({groups, T, T}, G.options().dtype(at::kDouble));
  double* const partial = partial_buffer.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gramian_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      // c10 aligns it to 64 bytes, a cache line: no vector load of a row (kColumns apart) straddles two lines.
      const at::Tensor buffer = at::empty({T, kColumns}, G.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* const rows = buffer.data_ptr<acc_t>();
      for (int64_t group = begin; group < end; ++group) {
        double* out = partial + group * T * T;
        for (int64_t chunk = group * per_group; chunk < std::min(chunks, (group + 1) * per_group); ++chunk) {
          const int64_t start = chunk * kColumns, width = std::min(kColumns, P - start);
          const int64_t padded = (width + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;
          for (int64_t t = 0; t < T; ++t) {
            acc_t* row = rows + t * kColumns;
            const scalar_t* src = g + t * P + start;
            for (int64_t k = 0; k < width; ++k) row[k] = static_cast<acc_t>(src[k]);
            std::fill(row + width, row + padded, acc_t(0));
          }
          chunk_gramian<acc_t>(rows, T, padded, out);
        }
      }
    });
  });
  at::Tensor result = at::empty({T, T}, G.options().dtype(at::kDouble));
  double* r = result.data_ptr<double>();
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t group = 0; group < groups; ++group) s += partial[group * T * T + i * T + j];
      r[i * T + j] = r[j * T + i] = s;
    }
  return result.to(acc_type);
}

// combine adds up to this many rows of G into its accumulator per sweep: that many streams in flight and a
// fraction of the accumulator traffic of one row a sweep. Each value is still added row by row in order, so the
// bits do not depend on it.
constexpr int kCombineRows = 4;

// acc[k] += Σ_r w[r]·rows[r·stride + k] for the R rows, in row order.
template <typename scalar_t, typename acc_t, int R>
void sweep_rows(const scalar_t* rows, int64_t stride, const acc_t* w, int64_t width, acc_t* acc) {
  const scalar_t* row[R];
  acc_t wr[R];
  _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
    row[r] = rows + r * stride;
    wr[r] = w[r];
  }
  _Pragma("omp simd") for (int64_t k = 0; k < width; ++k) {
    acc_t a = acc[k];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) a += wr[r] * static_cast<acc_t>(row[r][k]);
    acc[k] = a;
  }
}

at::Tensor combine_cpu(const at::Tensor& G_in, const at::Tensor& w_in) {
  check_matrix(G_in, "combine");
  const at::Tensor G = G_in.contiguous();
  const int64_t T = G.size(0), P = G.size(1);
  TORCH_CHECK_VALUE(w_in.dim() == 1 && w_in.size(0) == T, "combine: w must have shape (", T, ",), got ", w_in.sizes());
  TORCH_CHECK_VALUE(w_in.device().is_cpu(), "combine: w must be on the CPU");
  at::Tensor out = at::empty({P}, G.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = w_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (P + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kColumns);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t start = chunk * kColumns, width = std::min(kColumns, P - start);
        std::fill(acc.begin(), acc.begin() + width, acc_t(0));
        for (int64_t t = 0; t < T; t += kCombineRows)
          with_count<kCombineRows>(static_cast<int>(std::min<int64_t>(kCombineRows, T - t)), [&](auto n) {
            sweep_rows<scalar_t, acc_t, decltype(n)::value>(g + t * P + start, P, wp + t, width, acc.data());
          });
        _Pragma("omp simd") for (int64_t k = 0; k < width; ++k) o[start + k] = static_cast<scalar_t>(acc[k]);
      }
    });
  });
  return out;
}

}  // namespace

#if defined(TSBN_CPU_AVX2) || defined(TSBN_CPU_AVX512)
#ifdef TSBN_CPU_AVX512
extern const CpuGramianKernels kAvx512CpuGramianKernels = {&gramian_cpu, &combine_cpu};
#else
extern const CpuGramianKernels kAvx2CpuGramianKernels = {&gramian_cpu, &combine_cpu};
#endif
}  // namespace tsbn
TSBN_CPU_ISA_END
#else
extern const CpuGramianKernels kBaselineCpuGramianKernels = {&gramian_cpu, &combine_cpu};

TORCH_LIBRARY_FRAGMENT(tsbn, m) {
  m.def("gramian(Tensor G) -> Tensor");
  m.def("combine(Tensor G, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(tsbn, CPU, m) {
  const CpuGramianKernels& kernels =
      TSBN_CPU_KERNELS_FOR_THIS_CPU(kBaselineCpuGramianKernels, kAvx2CpuGramianKernels,
                                    kAvx512CpuGramianKernels);
  m.impl("gramian", kernels.gramian);
  m.impl("combine", kernels.combine);
}

}  // namespace tsbn
#endif
