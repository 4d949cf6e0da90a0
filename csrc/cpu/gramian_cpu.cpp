// Gramian G·Gᵀ and combination wᵀG of per-task gradients G [T, P] on the CPU, each in one pass over G.
// P is cut into fixed column chunks processed in parallel; each chunk's partial Gramian is summed in chunk
// order afterwards, so the result does not depend on the thread count. fp16/bf16 rows are widened to fp32
// per chunk; accumulation is fp32 (fp64 for fp64 input), per-chunk partials are summed in double.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

namespace tsbn {
namespace {

constexpr int64_t kColumns = 2048;  // T rows of a chunk stay in L2 while all T(T+1)/2 dot products run

void check_matrix(const at::Tensor& G, const char* op) {
  TORCH_CHECK_VALUE(G.dim() == 2, op, ": G must be 2-D [T, P], got ", G.dim(), "-D");
  TORCH_CHECK_VALUE(G.size(0) >= 1 && G.size(1) >= 1, op, ": G must have T >= 1 rows and P >= 1 columns, got ",
                    G.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(G.scalar_type()), op, ": G must be floating point, got ", G.scalar_type());
  TORCH_CHECK_VALUE(G.device().is_cpu(), op, ": G must be on the CPU");
}

at::Tensor gramian_cpu(const at::Tensor& G_in) {
  check_matrix(G_in, "gramian");
  const at::Tensor G = G_in.contiguous();
  const int64_t T = G.size(0), P = G.size(1);
  const int64_t chunks = (P + kColumns - 1) / kColumns;
  const at::ScalarType acc_type = G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<double> partial(chunks * T * T, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gramian_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> rows(T * kColumns);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t start = chunk * kColumns, width = std::min(kColumns, P - start);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t k = 0; k < width; ++k) rows[t * kColumns + k] = static_cast<acc_t>(g[t * P + start + k]);
        double* out = partial.data() + chunk * T * T;
        for (int64_t i = 0; i < T; ++i) {
          const acc_t* a = rows.data() + i * kColumns;
          for (int64_t j = 0; j <= i; ++j) {
            const acc_t* b = rows.data() + j * kColumns;
            acc_t dot = 0;
            _Pragma("omp simd reduction(+ : dot)") for (int64_t k = 0; k < width; ++k) dot += a[k] * b[k];
            out[i * T + j] = dot;
          }
        }
      }
    });
  });
  at::Tensor result = at::empty({T, T}, G.options().dtype(at::kDouble));
  double* r = result.data_ptr<double>();
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * T * T + i * T + j];
      r[i * T + j] = r[j * T + i] = s;
    }
  return result.to(acc_type);
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
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* row = g + t * P + start;
          const acc_t wt = wp[t];
          _Pragma("omp simd") for (int64_t k = 0; k < width; ++k) acc[k] += wt * static_cast<acc_t>(row[k]);
        }
        _Pragma("omp simd") for (int64_t k = 0; k < width; ++k) o[start + k] = static_cast<scalar_t>(acc[k]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tsbn, m) {
  m.def("gramian(Tensor G) -> Tensor");
  m.def("combine(Tensor G, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(tsbn, CPU, m) {
  m.impl("gramian", &gramian_cpu);
  m.impl("combine", &combine_cpu);
}

}  // namespace tsbn
