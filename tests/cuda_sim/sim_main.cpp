// Runs the CUDA kernels of csrc/cuda/ts_batch_norm_kernels.cuh on the host (sim_cuda.h) for many shapes,
// layouts, pack widths, task layouts and grid sizes, and checks them against a float64 reference:
//   - every output element is written (outputs start as NaN) and matches the reference,
//   - every partial-count slot is written, the counts of each task add up to N_t · S,
//   - results are bitwise equal for different grid sizes (determinism does not depend on the grid).
// The host orchestration below mirrors csrc/cuda/ts_batch_norm_cuda.cu (plan, launches, [T, C] steps).
// Build: g++ -std=c++20 -O1 -U_FORTIFY_SOURCE -I<torch>/include -I csrc tests/cuda_sim/sim_main.cpp -o sim
// (tests/test_cuda_kernel_sim.py does this).
// Usage: sim [smoke|quick|full] [seed]; SIM_FILTER=substring runs only the matching cases.
#include "sim_cuda.h"

#include "cuda/ts_batch_norm_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using namespace tsbn::bn_kernels;

namespace {

int failures = 0;
int checks = 0;

#define EXPECT(cond, ...)                      \
  do {                                         \
    ++checks;                                  \
    if (!(cond)) {                             \
      ++failures;                              \
      std::printf("FAIL %s: ", case_name.c_str()); \
      std::printf(__VA_ARGS__);                \
      std::printf("\n");                       \
      if (failures > 40) std::exit(1);         \
    }                                          \
  } while (0)

std::string case_name;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, double>) return "f64";
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, c10::Half>) return "f16";
  return "bf16";
}

// 64-byte aligned storage, optionally starting `shift` elements late (misaligned packs).
template <typename T>
struct Buffer {
  Buffer(size_t n, int shift = 0) : raw((n + shift) * sizeof(T) + 128), n(n) {
    auto p = reinterpret_cast<std::uintptr_t>(raw.data());
    p = (p + 63) & ~std::uintptr_t(63);
    data = reinterpret_cast<T*>(p) + shift;
  }
  std::vector<unsigned char> raw;
  size_t n;
  T* data;
  T& operator[](size_t i) { return data[i]; }
  const T& operator[](size_t i) const { return data[i]; }
};

struct Case {
  int N = 1, C = 1;
  int64_t S = 1;
  bool interleaved = false;
  int T = 1;
  std::vector<int32_t> ids;  // empty: replicated batch
  bool training = true, sigmoid = true, relu = false, weight = true, bias = false;
  double eps = 1e-5, offset = 2.0;
  int sms = 4;
  int shift = 0;  // element offset of the input buffers (misaligned packs)
};

int task_of(const Case& cs, int n) { return cs.ids.empty() ? n / (cs.N / cs.T) : cs.ids[n]; }

int64_t index_of(const Case& cs, int n, int c, int64_t s) {
  return cs.interleaved ? (static_cast<int64_t>(n) * cs.S + s) * cs.C + c
                        : (static_cast<int64_t>(n) * cs.C + c) * cs.S + s;
}

template <typename T>
double to_d(T v) {
  return static_cast<double>(static_cast<typename AccOf<T>::type>(v));
}

struct Outputs {
  std::vector<double> y, mean, var, invstd, count, dx, dweight, dbias;
};

bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

template <typename scalar_t, int VEC>
Outputs run_kernels(const Case& cs, const Buffer<scalar_t>& x, const Buffer<scalar_t>& dy,
                    const std::vector<double>& weight, const std::vector<double>& bias,
                    const std::vector<double>& rmean, const std::vector<double>& rvar, int resident) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int N = cs.N, C = cs.C, T = cs.T;
  const int64_t S = cs.S, M = static_cast<int64_t>(N) * C * S;
  const int32_t* ids = cs.ids.empty() ? nullptr : cs.ids.data();
  const int64_t per_task = cs.ids.empty() ? N / T : 1;
  Outputs out;
  // [T, C] tables in the accumulation type, as the host code builds them with ATen.
  std::vector<acc_t> gate(T * C), shift(T * C);
  for (int k = 0; k < T * C; ++k) {
    const acc_t w = static_cast<acc_t>(weight[k]);
    gate[k] = cs.sigmoid ? acc_t(1) / (acc_t(1) + std::exp(-w)) : w;
    shift[k] = static_cast<acc_t>(bias[k]);
  }
  const acc_t* gate_p = cs.weight ? gate.data() : nullptr;
  const acc_t* shift_p = cs.bias ? shift.data() : nullptr;
  const int groups = (C + 31) / 32;
  const int merge_blocks = T * groups;
  std::vector<acc_t> mean(T * C, NAN), var(T * C, NAN), invstd(T * C, NAN), scale(T * C, NAN), count(T, NAN);

  // ---- forward
  constexpr int U1 = tile_depth<scalar_t, VEC, 1>();
  const Plan p1 = make_plan(N, C, S, cs.interleaved, VEC, U1, 8 * cs.sms, ids, per_task);
  EXPECT(p1.fits, "plan does not fit");
  const int grid1 = std::max(1, std::min(p1.units, resident));
  if (cs.training) {
    std::vector<double> part_mean(static_cast<size_t>(p1.slots) * C, NAN);
    std::vector<acc_t> part_m2(part_mean.size(), NAN);
    std::vector<int64_t> part_count(p1.slots, -7);
    sim::launch(grid1, kThreads, [&] {
      if (cs.interleaved)
        moments_interleaved_kernel<scalar_t, acc_t, VEC, U1>(x.data, p1, part_mean.data(), part_m2.data(),
                                                             part_count.data());
      else
        moments_planar_kernel<scalar_t, acc_t, VEC, U1>(x.data, p1, part_mean.data(), part_m2.data(),
                                                        part_count.data());
    });
    std::vector<int64_t> per(T, 0);
    for (int s = 0; s < p1.slots; ++s) {
      EXPECT(part_count[s] >= 0, "slot %d count never written (%lld)", s, (long long)part_count[s]);
      if (part_count[s] > 0) per[task_of(cs, s / p1.J)] += part_count[s];
      if (part_count[s] > 0)
        for (int c = 0; c < C; ++c)
          EXPECT(!std::isnan(part_mean[static_cast<size_t>(s) * C + c]), "slot %d channel %d unwritten", s, c);
    }
    for (int t = 0; t < T; ++t) {
      int64_t want = 0;
      for (int n = 0; n < N; ++n) want += task_of(cs, n) == t ? S : 0;
      EXPECT(per[t] == want, "task %d: slot counts add to %lld, want %lld", t, (long long)per[t], (long long)want);
    }
    sim::launch(merge_blocks, kMergeThreads, [&] {
      merge_moments_kernel<acc_t>(part_mean.data(), part_m2.data(), part_count.data(), p1, groups, cs.eps, gate_p,
                                  mean.data(), var.data(), invstd.data(), scale.data(), count.data());
    });
  } else {
    for (int k = 0; k < T * C; ++k) {
      mean[k] = static_cast<acc_t>(rmean[k]);
      var[k] = static_cast<acc_t>(rvar[k]);
      invstd[k] = acc_t(1) / std::sqrt(var[k] + static_cast<acc_t>(cs.eps));
      scale[k] = gate_p ? gate[k] * invstd[k] : invstd[k];
    }
    for (int t = 0; t < T; ++t) count[t] = 0;
  }
  Buffer<scalar_t> y(M, cs.shift);
  for (int64_t i = 0; i < M; ++i) y[i] = static_cast<scalar_t>(NAN);
  sim::launch(grid1, kThreads, [&] {
    if (cs.interleaved)
      apply_interleaved_kernel<scalar_t, acc_t, VEC, U1>(x.data, y.data, p1, mean.data(), scale.data(), shift_p,
                                                         cs.relu);
    else
      apply_planar_kernel<scalar_t, acc_t, VEC, U1>(x.data, y.data, p1, mean.data(), scale.data(), shift_p, cs.relu);
  });

  // ---- backward (saved statistics: mean, invstd)
  constexpr int U2 = tile_depth<scalar_t, VEC, 2>();
  const Plan p2 = make_plan(N, C, S, cs.interleaved, VEC, U2, 8 * cs.sms, ids, per_task);
  const int grid2 = std::max(1, std::min(p2.units, resident));
  std::vector<acc_t> part_s1(static_cast<size_t>(p2.slots) * C, NAN), part_s2(part_s1.size(), NAN);
  std::vector<int64_t> part_count(p2.slots, -7);
  sim::launch(grid2, kThreads, [&] {
    if (cs.interleaved)
      grad_sums_interleaved_kernel<scalar_t, acc_t, VEC, U2>(x.data, dy.data, p2, mean.data(), scale.data(), shift_p,
                                                             cs.relu, part_s1.data(), part_s2.data(),
                                                             part_count.data());
    else
      grad_sums_planar_kernel<scalar_t, acc_t, VEC, U2>(x.data, dy.data, p2, mean.data(), scale.data(), shift_p,
                                                        cs.relu, part_s1.data(), part_s2.data(), part_count.data());
  });
  for (int s = 0; s < p2.slots; ++s) EXPECT(part_count[s] >= 0, "backward slot %d count never written", s);
  std::vector<double> s1(T * C, NAN), s2(T * C, NAN);
  std::vector<acc_t> coef_dy(T * C, NAN), coef_d(T * C, NAN), coef_0(T * C, NAN);
  sim::launch(merge_blocks, kMergeThreads, [&] {
    merge_sums_kernel<acc_t>(part_s1.data(), part_s2.data(), part_count.data(), p2, groups, gate_p, invstd.data(),
                             cs.training, s1.data(), s2.data(), coef_dy.data(), coef_d.data(), coef_0.data());
  });
  Buffer<scalar_t> dx(M, cs.shift);
  for (int64_t i = 0; i < M; ++i) dx[i] = static_cast<scalar_t>(NAN);
  sim::launch(grid2, kThreads, [&] {
    if (cs.interleaved)
      grad_input_interleaved_kernel<scalar_t, acc_t, VEC, U2>(x.data, dy.data, dx.data, p2, mean.data(), scale.data(),
                                                              shift_p, coef_dy.data(), coef_d.data(), coef_0.data(),
                                                              cs.relu);
    else
      grad_input_planar_kernel<scalar_t, acc_t, VEC, U2>(x.data, dy.data, dx.data, p2, mean.data(), scale.data(),
                                                         shift_p, coef_dy.data(), coef_d.data(), coef_0.data(),
                                                         cs.relu);
  });
  out.y.resize(M);
  out.dx.resize(M);
  for (int64_t i = 0; i < M; ++i) {
    out.y[i] = to_d(y[i]);
    out.dx[i] = to_d(dx[i]);
  }
  for (int k = 0; k < T * C; ++k) {
    out.mean.push_back(mean[k]);
    out.var.push_back(var[k]);
    out.invstd.push_back(invstd[k]);
    const double r = static_cast<double>(invstd[k]);
    double dw = s2[k] * r;
    if (cs.sigmoid) {
      const double sg = 1.0 / (1.0 + std::exp(-weight[k]));
      dw *= sg * (1 - sg);
    }
    out.dweight.push_back(dw);
    out.dbias.push_back(s1[k]);
  }
  for (int t = 0; t < T; ++t) out.count.push_back(count[t]);
  return out;
}

template <typename scalar_t>
double tolerance() {
  if constexpr (std::is_same_v<scalar_t, double>) return 1e-9;
  if constexpr (std::is_same_v<scalar_t, float>) return 1e-4;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return 4e-3;
  return 3e-2;
}

// |got − want| <= tol · (max(1, max|want|) + magnitude[i]); magnitude: the size of the terms that cancel in
// element i (an ill-conditioned element, e.g. dx of a task with m = 2, may lose that much in fp32).
void compare(const char* what, const std::vector<double>& got, const std::vector<double>& want, double tol,
             const std::vector<double>& magnitude = {}) {
  double scale = 1.0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double mag = magnitude.empty() ? std::abs(want[i]) : magnitude[i];
    const bool ok = std::isfinite(got[i]) && std::abs(got[i] - want[i]) <= tol * (scale + mag);
    if (!ok && bad++ == 0) first = i;
  }
  EXPECT(bad == 0, "%s: %zu of %zu wrong, first [%zu] got %.9g want %.9g", what, bad, want.size(), first, got[first],
         want[first]);
}

template <typename scalar_t>
void run_case(const Case& cs, std::mt19937_64& rng, bool all_vecs) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int N = cs.N, C = cs.C, T = cs.T;
  const int64_t S = cs.S, M = static_cast<int64_t>(N) * C * S;
  std::normal_distribution<double> normal;
  Buffer<scalar_t> x(M, cs.shift), dy(M, cs.shift);
  std::vector<double> chan(C);
  for (int c = 0; c < C; ++c) chan[c] = cs.offset * (std::abs(normal(rng)) + 1.0);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = index_of(cs, n, c, s);
        x[i] = static_cast<scalar_t>(normal(rng) + chan[c] + 0.3 * task_of(cs, n));
        dy[i] = static_cast<scalar_t>(normal(rng));
      }
  std::vector<double> weight(T * C), bias(T * C), rmean(T * C), rvar(T * C);
  for (int k = 0; k < T * C; ++k) {
    weight[k] = static_cast<double>(static_cast<acc_t>(normal(rng)));
    bias[k] = cs.bias ? static_cast<double>(static_cast<acc_t>(normal(rng))) : 0.0;
    rmean[k] = static_cast<double>(static_cast<acc_t>(normal(rng) + cs.offset));
    rvar[k] = static_cast<double>(static_cast<acc_t>(std::abs(normal(rng)) + 0.5));
  }

  // float64 reference on the rounded inputs
  Outputs ref;
  std::vector<double> a(T * C), b(T * C), mu(T * C, 0), var(T * C, 0), r(T * C), m(T, 0);
  std::vector<acc_t> gate_acc(T * C);
  for (int k = 0; k < T * C; ++k) {
    const acc_t w = static_cast<acc_t>(weight[k]);
    gate_acc[k] = cs.sigmoid ? acc_t(1) / (acc_t(1) + std::exp(-w)) : w;
    a[k] = cs.weight ? static_cast<double>(gate_acc[k]) : 1.0;
    b[k] = bias[k];
  }
  for (int n = 0; n < N; ++n) m[task_of(cs, n)] += static_cast<double>(S);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) mu[task_of(cs, n) * C + c] += to_d(x[index_of(cs, n, c, s)]);
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < C; ++c) mu[t * C + c] = m[t] > 0 ? mu[t * C + c] / m[t] : 0.0;
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int k = task_of(cs, n) * C + c;
        const double d = to_d(x[index_of(cs, n, c, s)]) - mu[k];
        var[k] += d * d;
      }
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < C; ++c) var[t * C + c] = m[t] > 0 ? var[t * C + c] / m[t] : 0.0;
  if (!cs.training) {
    mu = rmean;
    var = rvar;
  }
  for (int k = 0; k < T * C; ++k) r[k] = 1.0 / std::sqrt(var[k] + cs.eps);
  ref.y.assign(M, 0);
  ref.dx.assign(M, 0);
  std::vector<double> dx_terms(M, 0);
  std::vector<double> g(M), s1(T * C, 0), s2(T * C, 0);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = index_of(cs, n, c, s);
        const int k = task_of(cs, n) * C + c;
        const double d = to_d(x[i]) - mu[k];
        const double pre = a[k] * r[k] * d + b[k];
        ref.y[i] = cs.relu ? std::max(0.0, pre) : pre;
        g[i] = cs.relu && !(pre > 0) ? 0.0 : to_d(dy[i]);
        s1[k] += g[i];
        s2[k] += g[i] * d;
      }
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = index_of(cs, n, c, s);
        const int t = task_of(cs, n), k = t * C + c;
        const double d = to_d(x[i]) - mu[k];
        double v = a[k] * r[k] * g[i];
        dx_terms[i] = std::abs(v);
        if (cs.training && m[t] > 0) {
          v -= a[k] * r[k] * (s1[k] / m[t] + d * r[k] * r[k] * s2[k] / m[t]);
          dx_terms[i] += std::abs(a[k] * r[k] * s1[k] / m[t]) + std::abs(a[k] * r[k] * d * r[k] * r[k] * s2[k] / m[t]);
        }
        ref.dx[i] = v;
      }
  for (int k = 0; k < T * C; ++k) {
    double dw = s2[k] * r[k];
    if (cs.sigmoid) {
      const double sg = 1.0 / (1.0 + std::exp(-weight[k]));
      dw *= sg * (1 - sg);
    }
    ref.dweight.push_back(dw);
    ref.dbias.push_back(s1[k]);
    ref.mean.push_back(cs.training ? mu[k] : rmean[k]);
    ref.var.push_back(cs.training ? var[k] : rvar[k]);
  }
  for (int t = 0; t < T; ++t) ref.count.push_back(cs.training ? m[t] : 0.0);

  const int64_t extent = cs.interleaved ? C : S;
  const auto aligned = [&](int vec) { return extent % vec == 0 && cs.shift % vec == 0; };
  std::vector<int> vecs;
  for (int v = static_cast<int>(16 / sizeof(scalar_t)); v >= 1; v /= 2)
    if (aligned(v)) vecs.push_back(v);
  if (!all_vecs) vecs.resize(1);  // the width the host code would pick
  // |mean| >> std: the fp32 mean itself is rounded to ~1e-3 std, which moves y, dx and dweight by as much
  // (the test suite's large-mean tolerances); the variance must stay exact.
  const double tol = cs.offset > 100 ? 3e-3 : tolerance<scalar_t>();
  const double stat_tol = std::is_same_v<scalar_t, double> ? 1e-10 : 2e-6;
  for (int vec : vecs) {
    const std::string base = case_name;
    case_name = base + " vec=" + std::to_string(vec);
    const auto run = [&](int resident) {
      Outputs o;
      const auto go = [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        o = run_kernels<scalar_t, V>(cs, x, dy, weight, bias, rmean, rvar, resident);
      };
      if constexpr (sizeof(scalar_t) <= 2)
        if (vec == 8) return go(std::integral_constant<int, 8>()), o;
      if constexpr (sizeof(scalar_t) <= 4)
        if (vec == 4) return go(std::integral_constant<int, 4>()), o;
      if (vec == 2) return go(std::integral_constant<int, 2>()), o;
      go(std::integral_constant<int, 1>());
      return o;
    };
    const Outputs got = run(1 << 20);
    compare("y", got.y, ref.y, tol);
    compare("dx", got.dx, ref.dx, tol, dx_terms);
    compare("dweight", got.dweight, ref.dweight, tol);
    compare("dbias", got.dbias, ref.dbias, tol);
    // Statistics in the accumulation type: the variance to ~1e-6 also when |mean| >> std.
    compare("mean", got.mean, ref.mean, stat_tol);
    compare("var", got.var, ref.var, stat_tol);
    for (int t = 0; t < T; ++t)
      EXPECT(got.count[t] == ref.count[t], "count[%d] %g want %g", t, got.count[t], ref.count[t]);
    const Outputs again = run(2);  // another grid: the same bits
    EXPECT(bitwise_equal(got.y, again.y) && bitwise_equal(got.dx, again.dx) && bitwise_equal(got.mean, again.mean) &&
               bitwise_equal(got.var, again.var) && bitwise_equal(got.dweight, again.dweight) &&
               bitwise_equal(got.dbias, again.dbias),
           "results depend on the grid size");
    case_name = base;
  }
}

template <typename scalar_t>
void run_named(Case cs, std::mt19937_64& rng, bool all_vecs) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s N=%d C=%d S=%lld %s T=%d ids=%s train=%d relu=%d sig=%d w=%d b=%d sms=%d shift=%d",
                type_name<scalar_t>(), cs.N, cs.C, (long long)cs.S, cs.interleaved ? "NHWC" : "NCHW", cs.T,
                cs.ids.empty() ? "none" : "given", cs.training, cs.relu, cs.sigmoid, cs.weight, cs.bias, cs.sms,
                cs.shift);
  if (const char* only = std::getenv("SIM_FILTER"); only && !std::strstr(buf, only)) return;
  case_name = buf;
  const int before = failures;
  run_case<scalar_t>(cs, rng, all_vecs);
  std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", buf);
  std::fflush(stdout);
}

std::vector<int32_t> ragged_ids(int N, int T, std::mt19937_64& rng, int kind) {
  std::vector<int32_t> ids(N);
  for (int n = 0; n < N; ++n) {
    switch (kind) {
      case 0: ids[n] = static_cast<int32_t>(rng() % T); break;                 // random
      case 1: ids[n] = static_cast<int32_t>(n % T); break;                     // alternating
      case 2: ids[n] = static_cast<int32_t>(std::min<int64_t>(T - 1, (int64_t)n * T / N)); break;  // sorted
      default: ids[n] = static_cast<int32_t>((rng() % 2) ? T - 1 : 0); break;  // two tasks, others empty
    }
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  // smoke: a few minutes' worth cut to well under one (the pytest wrapper); quick: every shape below in
  // f32 over all pack widths plus f64/bf16/f16; full: more shapes, every dtype over all pack widths.
  const std::string mode = argc > 1 ? argv[1] : "quick";
  const bool full = mode == "full", smoke = mode == "smoke";
  if (!full && !smoke && mode != "quick") {
    std::printf("usage: %s [smoke|quick|full] [seed]\n", argv[0]);
    return 2;
  }
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1234);

  // Planar and interleaved geometry over the pack widths, chunk splits (small sms -> large units; large sms ->
  // many chunks per sample) and sample blocks (small S).
  struct Shape {
    int N, C;
    int64_t S;
    int T;
  };
  std::vector<Shape> shapes = {{6, 5, 1, 3},    {6, 3, 7, 3},    {6, 4, 15, 3},   {9, 17, 15, 3},  {6, 24, 323, 3},
                               {4, 1, 4099, 2}, {8, 64, 16, 4},  {6, 2048, 1, 3}, {80, 16, 4, 40}, {3, 8, 1000, 1},
                               {12, 7, 143, 3}, {6, 33, 49, 2},  {2, 5, 17000, 2},
                               {6, 256, 4, 3},      // planar, one lane per plane
                               {4, 300, 2, 2},      // planar, one lane per plane, two channel blocks
                               {2, 1, 300000, 2}};  // several merge windows of slots per warp
  if (smoke) shapes = {{6, 24, 323, 3}, {80, 16, 4, 40}, {9, 17, 15, 3}, {4, 300, 2, 2}, {6, 5, 1, 3}};
  if (full) {
    shapes.push_back({40, 32, 108, 40});
    shapes.push_back({6, 256, 36, 3});
    shapes.push_back({24, 3, 2000, 3});
  }
  for (const Shape& sh : shapes)
    for (bool interleaved : {false, true}) {
      if (sh.S == 1 && !interleaved) continue;  // 2-D inputs are interleaved
      for (int sms : {1, 132}) {
        Case cs;
        cs.N = sh.N;
        cs.C = sh.C;
        cs.S = sh.S;
        cs.T = sh.T;
        cs.interleaved = interleaved;
        cs.sms = sms;
        cs.relu = (sh.C + sms) % 2 == 0;
        cs.bias = cs.relu;
        run_named<float>(cs, rng, true);
        if (smoke) continue;
        run_named<c10::BFloat16>(cs, rng, full);
        if (full || sh.C * sh.S < 20000) {
          run_named<double>(cs, rng, true);
          run_named<c10::Half>(cs, rng, full);
        }
      }
    }
  // Task layouts: random (with empty tasks), alternating (every sample its own segment), sorted runs, two
  // tasks of five; {1500, 3, 1} has more valid slots than one merge window per warp.
  for (int kind = 0; kind < 4; ++kind)
    for (bool interleaved : {false, true}) {
      for (auto [N, C, S] :
           {std::tuple<int, int, int64_t>{9, 5, 12}, {37, 6, 1}, {70, 8, 3}, {13, 4, 600}, {1500, 3, 1}}) {
        if (S == 1 && !interleaved) continue;
        Case cs;
        cs.N = N;
        cs.C = C;
        cs.S = S;
        cs.T = 5;
        cs.interleaved = interleaved;
        cs.ids = ragged_ids(N, cs.T, rng, kind);
        cs.relu = true;
        cs.bias = true;
        cs.sms = kind % 2 ? 1 : 132;
        if (!smoke) run_named<double>(cs, rng, true);
        run_named<float>(cs, rng, false);
      }
    }
  // Modes: eval, gate "none", no affine, misaligned buffers, |mean| = 1e4 · std.
  for (bool interleaved : {false, true}) {
    Case cs;
    cs.N = 6;
    cs.C = 8;
    cs.S = 40;
    cs.T = 3;
    cs.interleaved = interleaved;
    cs.training = false;
    cs.relu = true;
    cs.bias = true;
    run_named<float>(cs, rng, true);
    cs.training = true;
    cs.sigmoid = false;
    run_named<float>(cs, rng, true);
    cs.weight = false;
    cs.bias = false;
    cs.relu = false;
    run_named<double>(cs, rng, true);
    cs.weight = true;
    cs.shift = 1;
    run_named<float>(cs, rng, false);
    run_named<c10::Half>(cs, rng, false);
    cs.shift = 0;
    cs.offset = 1e4;
    cs.N = 6;
    cs.C = 4;
    cs.S = 99;
    run_named<float>(cs, rng, true);
  }
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
