// Fused task-specific (sigmoid) batch norm on the CPU: training forward, eval forward, backward and the
// running-statistics update. Semantics: tsbn_kernels/reference.py (DESIGN.md §1).
//
// The input is viewed as [N, C, S] blocks. NCHW ("planar"): every (sample, channel) plane of S values is
// contiguous and is one block. Channels-last and 2-D inputs ("interleaved"): each spatial position holds C
// contiguous channels; a block is a chunk of rows of one sample, sized to stay in cache. Each block yields
// partial moments per channel (a shifted two-pass mean and M2, exact when |mean| >> std); partials are
// merged per (task, channel) with Chan's formula in block order, so results do not depend on the thread
// count. The apply passes fold gate, affine, mean and rstd into per-(task, channel) coefficients, and the
// relu mask of the backward pass is recomputed from x instead of being stored.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../ts_batch_norm_layout.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace tsbn {
namespace {

// Rows of a channels-last block: about 16 KiB of values per block keeps the second pass in L1/L2.
constexpr int64_t kInterleavedBlockValues = 4096;

struct Blocks {
  at::Tensor x;                    // dense input (planar: contiguous; interleaved: channels-last dense)
  int64_t N = 0, C = 0, S = 0;
  bool interleaved = false;
  int64_t rows_per_block = 0;      // interleaved only
  int64_t blocks_per_sample = 0;   // planar: 1 (the planes of a sample are indexed by channel)
  std::vector<int64_t> task_of;    // task of each sample

  int64_t num_blocks() const { return N * blocks_per_sample; }
  int64_t rows_in(int64_t chunk) const {
    return interleaved ? std::min(rows_per_block, S - chunk * rows_per_block) : S;
  }
};

std::vector<int64_t> task_of_samples(const c10::optional<at::Tensor>& task_ids, int64_t N, int64_t T) {
  std::vector<int64_t> task_of(N);
  if (task_ids.has_value() && task_ids->defined()) {
    TORCH_CHECK_VALUE(task_ids->dim() == 1 && task_ids->size(0) == N, "ts_batch_norm: task_ids must have shape (",
                      N, ",), got ", task_ids->sizes());
    TORCH_CHECK_TYPE(at::isIntegralType(task_ids->scalar_type(), false), "ts_batch_norm: task_ids must be integer");
    const at::Tensor ids = task_ids->to(at::kLong).contiguous();
    const int64_t* data = ids.const_data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(data[n] >= 0 && data[n] < T, "ts_batch_norm: task_ids must lie in [0, ", T, "), got ",
                        data[n]);
      task_of[n] = data[n];
    }
  } else {
    TORCH_CHECK_VALUE(N % T == 0, "ts_batch_norm: batch size ", N, " is not divisible by num_tasks=", T);
    const int64_t per_task = N / T;
    for (int64_t n = 0; n < N; ++n) task_of[n] = n / per_task;
  }
  return task_of;
}

Blocks make_blocks(const at::Tensor& x, const c10::optional<at::Tensor>& task_ids, int64_t T) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 5, "ts_batch_norm: expected a 2D to 5D input, got ", x.dim(), "D");
  TORCH_CHECK_VALUE(T >= 1, "ts_batch_norm: num_tasks must be >= 1, got ", T);
  Blocks b;
  b.interleaved = is_interleaved(x);
  b.x = x.contiguous(layout_of(x, b.interleaved));
  b.N = x.size(0);
  b.C = x.size(1);
  b.S = b.N && b.C ? x.numel() / (b.N * b.C) : 0;
  if (b.interleaved) {
    b.rows_per_block = std::max<int64_t>(1, kInterleavedBlockValues / std::max<int64_t>(b.C, 1));
    b.blocks_per_sample = std::max<int64_t>(1, (b.S + b.rows_per_block - 1) / b.rows_per_block);
  } else {
    b.blocks_per_sample = 1;
  }
  b.task_of = task_of_samples(task_ids, b.N, T);
  return b;
}

// Element loads and stores in the accumulation type. bf16 converts through its raw bits (a shift, and
// round-to-nearest-even on the way back), which the simd loops vectorise; c10::BFloat16's own conversions go
// through a struct and a NaN branch that GCC leaves scalar. Results are bit-identical to c10's conversions.
template <typename acc_t, typename scalar_t>
inline acc_t load_acc(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

template <typename acc_t>
inline acc_t load_acc(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return static_cast<acc_t>(value);
}

template <typename scalar_t, typename acc_t>
inline void store_elem(scalar_t* p, int64_t i, acc_t v) {
  p[i] = static_cast<scalar_t>(v);
}

inline void store_elem(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  reinterpret_cast<uint16_t*>(p)[i] = nan ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// Per-(task, channel) parameters in the accumulation type, [T * C] each.
template <typename acc_t>
std::vector<acc_t> table(const c10::optional<at::Tensor>& t, int64_t T, int64_t C, acc_t fill, const char* name) {
  std::vector<acc_t> out(T * C, fill);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == T && t->size(1) == C, "ts_batch_norm: ", name,
                      " must have shape (", T, ", ", C, "), got ", t->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "ts_batch_norm: ", name, " must be floating point");
    TORCH_CHECK_VALUE(t->device().is_cpu(), "ts_batch_norm: ", name, " must be on the CPU");
    const at::Tensor dense = t->detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy(dense.const_data_ptr<acc_t>(), dense.const_data_ptr<acc_t>() + T * C, out.begin());
  }
  return out;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t w) {
  return acc_t(1) / (acc_t(1) + std::exp(-w));
}

// The per-(task, channel) scale a: sigmoid(weight), weight, or 1 without affine.
template <typename acc_t>
std::vector<acc_t> gate_table(const c10::optional<at::Tensor>& weight, int64_t T, int64_t C, bool sigmoid_gate) {
  std::vector<acc_t> a = table<acc_t>(weight, T, C, acc_t(1), "weight");
  if (sigmoid_gate && weight.has_value() && weight->defined())
    for (auto& v : a) v = sigmoid(v);
  return a;
}

// Partial moments of one block, for every channel: mean and M2 over the block's values.
template <typename scalar_t, typename acc_t>
void block_moments(const Blocks& b, const scalar_t* x, int64_t n, int64_t chunk, acc_t* mean, acc_t* m2) {
  if (!b.interleaved) {
    // Planar: `chunk` is unused; every channel's plane is its own block, done one plane at a time.
    for (int64_t c = 0; c < b.C; ++c) {
      const scalar_t* p = x + (n * b.C + c) * b.S;
      const acc_t shift = load_acc<acc_t>(p, 0);
      acc_t s = 0;
_Pragma("omp simd reduction(+ : s)")
      for (int64_t i = 0; i < b.S; ++i) s += load_acc<acc_t>(p, i) - shift;
      const acc_t mu = shift + s / static_cast<acc_t>(b.S);
      acc_t q = 0;
_Pragma("omp simd reduction(+ : q)")
      for (int64_t i = 0; i < b.S; ++i) {
        const acc_t d = load_acc<acc_t>(p, i) - mu;
        q += d * d;
      }
      mean[c] = mu;
      m2[c] = q;
    }
    return;
  }
  const int64_t rows = b.rows_in(chunk);
  const scalar_t* base = x + (n * b.S + chunk * b.rows_per_block) * b.C;
  const int64_t C = b.C;
  for (int64_t c = 0; c < C; ++c) mean[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = base + r * C;
_Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) mean[c] += load_acc<acc_t>(row, c) - load_acc<acc_t>(base, c);
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = load_acc<acc_t>(base, c) + mean[c] / static_cast<acc_t>(rows);
    m2[c] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = base + r * C;
_Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = load_acc<acc_t>(row, c) - mean[c];
      m2[c] += d * d;
    }
  }
}

struct Stats {
  at::Tensor mean, invstd, var, count;  // [T, C], [T, C], [T, C], [T]
};

template <typename scalar_t, typename acc_t>
Stats batch_stats(const Blocks& b, int64_t T, double eps) {
  const int64_t C = b.C, B = b.num_blocks();
  const scalar_t* x = b.x.const_data_ptr<scalar_t>();
  // Partials [B, C]: one row per block (planar: per sample, one column per channel plane).
  std::vector<acc_t> part_mean(B * C), part_m2(B * C);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / b.blocks_per_sample, chunk = blk % b.blocks_per_sample;
      block_moments<scalar_t, acc_t>(b, x, n, chunk, part_mean.data() + blk * C, part_m2.data() + blk * C);
    }
  });
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  Stats st;
  st.mean = at::zeros({T, C}, b.x.options().dtype(acc_type));
  st.var = at::zeros({T, C}, b.x.options().dtype(acc_type));
  st.invstd = at::empty({T, C}, b.x.options().dtype(acc_type));
  st.count = at::zeros({T}, b.x.options().dtype(acc_type));
  acc_t* mean = st.mean.data_ptr<acc_t>();
  acc_t* var = st.var.data_ptr<acc_t>();
  acc_t* invstd = st.invstd.data_ptr<acc_t>();
  acc_t* count = st.count.data_ptr<acc_t>();
  std::vector<double> n_of_task(T, 0.0);
  for (int64_t blk = 0; blk < B; ++blk)
    n_of_task[b.task_of[blk / b.blocks_per_sample]] += b.rows_in(blk % b.blocks_per_sample);
  for (int64_t t = 0; t < T; ++t) count[t] = static_cast<acc_t>(n_of_task[t]);
  // Chan merge in block order, in double: deterministic whatever the thread count.
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<double> cnt(T * width, 0.0), mu(T * width, 0.0), m2(T * width, 0.0);
    for (int64_t blk = 0; blk < B; ++blk) {
      const int64_t t = b.task_of[blk / b.blocks_per_sample];
      const double nb = static_cast<double>(b.rows_in(blk % b.blocks_per_sample));
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k = t * width + (c - c0);
        const double mb = part_mean[blk * C + c], qb = part_m2[blk * C + c];
        const double na = cnt[k], n = na + nb, delta = mb - mu[k];
        mu[k] += delta * nb / n;
        m2[k] += qb + delta * delta * na * nb / n;
        cnt[k] = n;
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k = t * width + (c - c0);
        const double v = cnt[k] > 0 ? m2[k] / cnt[k] : 0.0;
        mean[t * C + c] = static_cast<acc_t>(mu[k]);
        var[t * C + c] = static_cast<acc_t>(v);
        invstd[t * C + c] = static_cast<acc_t>(1.0 / std::sqrt(v + eps));
      }
  });
  return st;
}

// y = (x − mean)·scale + shift, then relu: gate, affine and rstd folded into scale and shift.
template <typename scalar_t, typename acc_t>
void apply_normalization(const Blocks& b, const acc_t* mean, const acc_t* scale, const acc_t* shift, bool relu,
                         scalar_t* y) {
  const scalar_t* x = b.x.const_data_ptr<scalar_t>();
  const int64_t C = b.C;
  if (!b.interleaved) {
    at::parallel_for(0, b.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t k = b.task_of[plane / C] * C + plane % C;
        const acc_t mu = mean[k], sc = scale[k], sh = shift[k];
        const scalar_t* p = x + plane * b.S;
        scalar_t* q = y + plane * b.S;
        if (relu) {
_Pragma("omp simd")
          for (int64_t i = 0; i < b.S; ++i)
            store_elem(q, i, std::max(acc_t(0), (load_acc<acc_t>(p, i) - mu) * sc + sh));
        } else {
_Pragma("omp simd")
          for (int64_t i = 0; i < b.S; ++i) store_elem(q, i, (load_acc<acc_t>(p, i) - mu) * sc + sh);
        }
      }
    });
    return;
  }
  at::parallel_for(0, b.num_blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / b.blocks_per_sample, chunk = blk % b.blocks_per_sample;
      const int64_t k0 = b.task_of[n] * C;
      const acc_t *mu = mean + k0, *sc = scale + k0, *sh = shift + k0;
      const int64_t offset = (n * b.S + chunk * b.rows_per_block) * C;
      for (int64_t r = 0, rows = b.rows_in(chunk); r < rows; ++r) {
        const scalar_t* p = x + offset + r * C;
        scalar_t* q = y + offset + r * C;
        if (relu) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c)
            store_elem(q, c, std::max(acc_t(0), (load_acc<acc_t>(p, c) - mu[c]) * sc[c] + sh[c]));
        } else {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) store_elem(q, c, (load_acc<acc_t>(p, c) - mu[c]) * sc[c] + sh[c]);
        }
      }
    }
  });
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "ts_batch_norm (cpu backend): input must be on the CPU, got ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "ts_batch_norm: input must be floating point, got ",
                   x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ts_bn_forward_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, double eps, bool sigmoid_gate,
    bool relu) {
  check_input(x);
  const Blocks b = make_blocks(x, task_ids, num_tasks);
  const int64_t T = num_tasks, C = b.C;
  at::Tensor y = at::empty_like(b.x);
  Stats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
      TORCH_CHECK_VALUE(x.numel() > 0, "ts_batch_norm: cannot normalise an empty input when training");
      std::vector<double> per_task(T, 0.0);
      for (int64_t n = 0; n < b.N; ++n) per_task[b.task_of[n]] += static_cast<double>(b.S);
      for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK_VALUE(per_task[t] != 1.0, "ts_batch_norm: expected more than 1 value per channel when training, "
                          "task ", t, " has 1");
      st = batch_stats<scalar_t, acc_t>(b, T, eps);
    } else {
      TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                            running_var->defined(),
                        "ts_batch_norm: eval needs running_mean and running_var");
      const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
      std::vector<acc_t> rm = table<acc_t>(running_mean, T, C, acc_t(0), "running_mean");
      std::vector<acc_t> rv = table<acc_t>(running_var, T, C, acc_t(1), "running_var");
      st.mean = at::from_blob(rm.data(), {T, C}, at::TensorOptions().dtype(acc_type)).clone();
      st.var = at::from_blob(rv.data(), {T, C}, at::TensorOptions().dtype(acc_type)).clone();
      st.invstd = (st.var + eps).rsqrt();
      st.count = at::zeros({T}, st.mean.options());
    }
    const std::vector<acc_t> a = gate_table<acc_t>(weight, T, C, sigmoid_gate);
    const std::vector<acc_t> beta = table<acc_t>(bias, T, C, acc_t(0), "bias");
    const acc_t* invstd = st.invstd.const_data_ptr<acc_t>();
    std::vector<acc_t> scale(T * C);
    for (int64_t k = 0; k < T * C; ++k) scale[k] = a[k] * invstd[k];
    if (b.N * C * b.S > 0)
      apply_normalization<scalar_t, acc_t>(b, st.mean.const_data_ptr<acc_t>(), scale.data(), beta.data(), relu,
                                           y.data_ptr<scalar_t>());
  });
  return {y, st.mean, st.invstd, st.var, st.count};
}

// Per block: s1 = Σ dy', s2 = Σ dy'·(x − mean), dy' = dy masked by the relu recomputed from x.
template <typename scalar_t, typename acc_t>
void block_grad_sums(const Blocks& b, const scalar_t* x, const scalar_t* dy, int64_t n, int64_t chunk,
                     const acc_t* mean, const acc_t* scale, const acc_t* shift, bool relu, acc_t* s1, acc_t* s2) {
  const int64_t C = b.C;
  const int64_t k0 = b.task_of[n] * C;
  if (!b.interleaved) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = (n * C + c) * b.S;
      const acc_t mu = mean[k0 + c], sc = scale[k0 + c], sh = shift[k0 + c];
      acc_t a1 = 0, a2 = 0;
      if (relu) {
_Pragma("omp simd reduction(+ : a1, a2)")
        for (int64_t i = 0; i < b.S; ++i) {
          const acc_t d = load_acc<acc_t>(x, off + i) - mu;
          const acc_t g = d * sc + sh > acc_t(0) ? load_acc<acc_t>(dy, off + i) : acc_t(0);
          a1 += g;
          a2 += g * d;
        }
      } else {
_Pragma("omp simd reduction(+ : a1, a2)")
        for (int64_t i = 0; i < b.S; ++i) {
          const acc_t g = load_acc<acc_t>(dy, off + i);
          a1 += g;
          a2 += g * (load_acc<acc_t>(x, off + i) - mu);
        }
      }
      s1[c] = a1;
      s2[c] = a2;
    }
    return;
  }
  const acc_t *mu = mean + k0, *sc = scale + k0, *sh = shift + k0;
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
  const int64_t offset = (n * b.S + chunk * b.rows_per_block) * C;
  for (int64_t r = 0, rows = b.rows_in(chunk); r < rows; ++r) {
    const scalar_t* xr = x + offset + r * C;
    const scalar_t* gr = dy + offset + r * C;
_Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = load_acc<acc_t>(xr, c) - mu[c];
      const acc_t g = (!relu || d * sc[c] + sh[c] > acc_t(0)) ? load_acc<acc_t>(gr, c) : acc_t(0);
      s1[c] += g;
      s2[c] += g * d;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ts_bn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_t, const at::Tensor& invstd_t,
    const c10::optional<at::Tensor>& task_ids, int64_t num_tasks, bool training, bool sigmoid_gate, bool relu) {
  check_input(x);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "ts_batch_norm backward: grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x.sizes());
  const Blocks b = make_blocks(x, task_ids, num_tasks);
  const int64_t T = num_tasks, C = b.C, B = b.num_blocks();
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(layout_of(x, b.interleaved));
  at::Tensor dx = at::empty_like(b.x);
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ts_bn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor mean_acc = mean_t.to(acc_type).contiguous(), invstd_acc = invstd_t.to(acc_type).contiguous();
    TORCH_CHECK_VALUE(mean_acc.numel() == T * C && invstd_acc.numel() == T * C,
                      "ts_batch_norm backward: saved statistics must have shape (", T, ", ", C, ")");
    const acc_t* mean = mean_acc.const_data_ptr<acc_t>();
    const acc_t* invstd = invstd_acc.const_data_ptr<acc_t>();
    const std::vector<acc_t> a = gate_table<acc_t>(weight, T, C, sigmoid_gate);
    const std::vector<acc_t> beta = table<acc_t>(bias, T, C, acc_t(0), "bias");
    std::vector<acc_t> scale(T * C);
    for (int64_t k = 0; k < T * C; ++k) scale[k] = a[k] * invstd[k];
    const scalar_t* xp = b.x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();

    std::vector<acc_t> part_s1(B * C), part_s2(B * C);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk)
        block_grad_sums<scalar_t, acc_t>(b, xp, gp, blk / b.blocks_per_sample, blk % b.blocks_per_sample, mean,
                                         scale.data(), beta.data(), relu, part_s1.data() + blk * C,
                                         part_s2.data() + blk * C);
    });
    // Block-order sums in double: deterministic.
    std::vector<double> s1(T * C, 0.0), s2(T * C, 0.0), m(T, 0.0);
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t blk = 0; blk < B; ++blk) {
        const int64_t t = b.task_of[blk / b.blocks_per_sample];
        for (int64_t c = c0; c < c1; ++c) {
          s1[t * C + c] += part_s1[blk * C + c];
          s2[t * C + c] += part_s2[blk * C + c];
        }
      }
    });
    for (int64_t n = 0; n < b.N; ++n) m[b.task_of[n]] += static_cast<double>(b.S);

    // dx = A·dy' + Bk·(x − mean) + Ck, with s2x = Σ dy'·x̂ = invstd·s2.
    std::vector<acc_t> A(T * C), Bk(T * C, acc_t(0)), Ck(T * C, acc_t(0));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = t * C + c;
        const double r = invstd[k], ar = static_cast<double>(a[k]) * r;
        A[k] = static_cast<acc_t>(ar);
        if (training && m[t] > 0) {
          Bk[k] = static_cast<acc_t>(-ar * r * (r * s2[k]) / m[t]);
          Ck[k] = static_cast<acc_t>(-ar * s1[k] / m[t]);
        }
      }
    if (weight.has_value() && weight->defined()) {
      std::vector<acc_t> w = table<acc_t>(weight, T, C, acc_t(0), "weight");
      at::Tensor dw = at::empty({T, C}, x.options().dtype(acc_type));
      acc_t* dwp = dw.data_ptr<acc_t>();
      for (int64_t k = 0; k < T * C; ++k) {
        const double s2x = static_cast<double>(invstd[k]) * s2[k];
        const double sg = sigmoid_gate ? static_cast<double>(sigmoid(w[k])) : 1.0;
        dwp[k] = static_cast<acc_t>(sigmoid_gate ? s2x * sg * (1.0 - sg) : s2x);
      }
      dweight = dw.to(weight->scalar_type());
    } else {
      dweight = at::empty({0}, x.options());
    }
    if (bias.has_value() && bias->defined()) {
      // copy=true: s1 is a local buffer, and .to() of a double tensor to double would otherwise alias it.
      dbias = at::from_blob(s1.data(), {T, C}, at::TensorOptions().dtype(at::kDouble))
                  .to(bias->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    } else {
      dbias = at::empty({0}, x.options());
    }

    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const acc_t* sh = beta.data();
    const acc_t* sc = scale.data();
    if (!b.interleaved) {
      at::parallel_for(0, b.N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t k = b.task_of[plane / C] * C + plane % C;
          const acc_t mu = mean[k], a_ = A[k], b_ = Bk[k], c_ = Ck[k], s_ = sc[k], h_ = sh[k];
          const int64_t off = plane * b.S;
_Pragma("omp simd")
          for (int64_t i = 0; i < b.S; ++i) {
            const acc_t d = load_acc<acc_t>(xp, off + i) - mu;
            const acc_t g = (!relu || d * s_ + h_ > acc_t(0)) ? load_acc<acc_t>(gp, off + i) : acc_t(0);
            store_elem(dxp, off + i, a_ * g + b_ * d + c_);
          }
        }
      });
    } else {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t n = blk / b.blocks_per_sample, chunk = blk % b.blocks_per_sample;
          const int64_t k0 = b.task_of[n] * C;
          const int64_t offset = (n * b.S + chunk * b.rows_per_block) * C;
          for (int64_t r = 0, rows = b.rows_in(chunk); r < rows; ++r) {
            const int64_t o = offset + r * C;
_Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c) {
              const int64_t k = k0 + c;
              const acc_t d = load_acc<acc_t>(xp, o + c) - mean[k];
              const acc_t g = (!relu || d * sc[k] + sh[k] > acc_t(0)) ? load_acc<acc_t>(gp, o + c) : acc_t(0);
              store_elem(dxp, o + c, A[k] * g + Bk[k] * d + Ck[k]);
            }
          }
        }
      });
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsbn, CPU, m) {
  m.impl("ts_bn_forward", &ts_bn_forward_cpu);
  m.impl("ts_bn_backward", &ts_bn_backward_cpu);
}

}  // namespace tsbn
