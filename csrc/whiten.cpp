// masked_whiten on CPU (see fastrlhf/ops/whiten.py for the semantics): two reduction passes in double
// (the mean, then the centred sum of squares, as verl computes them) and one pass that writes; the
// backward needs two sums over the upstream gradient and one writing pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "checks.h"

namespace fastrlhf {
namespace {

constexpr int64_t GRAIN = 1 << 16;

constexpr int WIDTH = 8;

// Sums of `terms(i, acc)` over [0, n): each task keeps WIDTH independent partial sums per quantity (so
// the compiler can use vector adds without reordering any one sum) and tasks are added in order, so
// the result does not depend on the number of threads.
template <int K, typename Terms>
std::array<double, K> sum(int64_t n, Terms terms) {
  const int64_t tasks = std::max<int64_t>(1, (n + GRAIN - 1) / GRAIN);
  std::vector<std::array<double, K>> partial(tasks, std::array<double, K>{});
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      double acc[K][WIDTH] = {};
      const int64_t begin = task * GRAIN, end = std::min(n, begin + GRAIN);
      int64_t i = begin;
      for (; i + WIDTH <= end; i += WIDTH) {
        for (int w = 0; w < WIDTH; ++w) terms(i + w, acc, w);
      }
      for (; i < end; ++i) terms(i, acc, 0);
      for (int k = 0; k < K; ++k)
        for (int w = 0; w < WIDTH; ++w) partial[task][k] += acc[k][w];
    }
  });
  std::array<double, K> total{};
  for (const auto& p : partial)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

// The mask as bytes: GCC does not vectorise loads of bool.
const uint8_t* bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

void check_inputs(const at::Tensor& x, const at::Tensor& mask) {
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating dtype, got ", x.scalar_type());
  check_like(mask, x, "mask");
  check_dtype(mask, at::kBool, "mask");
}

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_like(t, x, name);
  check_dtype(t, x.scalar_type(), name);
}

// Returns [mean, rstd] as a double tensor; writes the whitened values into `out`.
at::Tensor masked_whiten_forward(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps,
                                 at::Tensor& out) {
  check_inputs(x, mask);
  check_like_x(out, x, "out");
  const uint8_t* m = bytes(mask);
  const int64_t n = x.numel();
  at::Tensor stats = at::empty({2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_whiten_forward", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    // Every load is unconditional, then selected: a load under a condition cannot be vectorised.
    const auto counted = sum<2>(n, [&](int64_t i, double (*acc)[WIDTH], int w) {
      const double xi = static_cast<double>(in[i]);
      acc[0][w] += m[i] ? xi : 0.0;
      acc[1][w] += m[i] ? 1.0 : 0.0;
    });
    const double count = counted[1];
    TORCH_CHECK_VALUE(count >= 2, "mask: expected at least 2 elements set, got ", count);
    const double mean = counted[0] / count;
    const auto squares = sum<1>(n, [&](int64_t i, double (*acc)[WIDTH], int w) {
      const double d = static_cast<double>(in[i]) - mean;
      acc[0][w] += m[i] ? d * d : 0.0;
    });
    const double var = squares[0] / count * (count / (count - 1));  // verl: biased, then Bessel's factor
    const double rstd = 1.0 / std::sqrt(var + eps);
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t mean_a = static_cast<acc_t>(mean), rstd_a = static_cast<acc_t>(rstd);
    const acc_t shift = shift_mean ? acc_t(0) : mean_a;
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, GRAIN, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) y[i] = static_cast<scalar_t>((static_cast<acc_t>(in[i]) - mean_a) * rstd_a + shift);
    });
    stats[0] = mean;
    stats[1] = rstd;
  });
  return stats;
}

// d x_j = g_j r + m_j ((c - r) G / n - r^3 (x_j - mean) H / (n - 1)), with G = sum g, H = sum g (x - mean)
// over every element (the output is computed everywhere), r = rstd, c = 1 when the mean is added back.
void masked_whiten_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                            const at::Tensor& stats, bool shift_mean, at::Tensor& grad_x) {
  check_inputs(x, mask);
  check_like_x(grad, x, "grad");
  check_like_x(grad_x, x, "grad_x");
  check_flat(stats, at::kDouble, 2, "stats");
  const uint8_t* m = bytes(mask);
  const int64_t n = x.numel();
  const double mean = stats[0].item<double>(), rstd = stats[1].item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_whiten_backward", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const auto sums = sum<3>(n, [&](int64_t i, double (*acc)[WIDTH], int w) {
      const double gi = static_cast<double>(g[i]);
      acc[0][w] += gi;
      acc[1][w] += gi * (static_cast<double>(in[i]) - mean);
      acc[2][w] += m[i] ? 1.0 : 0.0;
    });
    const double count = sums[2];
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t r = static_cast<acc_t>(rstd), mean_a = static_cast<acc_t>(mean);
    const acc_t from_mean = static_cast<acc_t>(((shift_mean ? 0.0 : 1.0) - rstd) * sums[0] / count);
    const acc_t from_var = static_cast<acc_t>(rstd * rstd * rstd * sums[1] / (count - 1));
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, n, GRAIN, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const acc_t xi = static_cast<acc_t>(in[i]), gi = static_cast<acc_t>(g[i]);
        const acc_t masked = from_mean - from_var * (xi - mean_a);
        out[i] = static_cast<scalar_t>(gi * r + (m[i] ? masked : acc_t(0)));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def("masked_whiten_forward(Tensor x, Tensor mask, bool shift_mean, float eps, Tensor(a!) out) -> Tensor");
  m.def("masked_whiten_backward(Tensor grad, Tensor x, Tensor mask, Tensor stats, bool shift_mean, Tensor(a!) grad_x) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) {
  m.impl("masked_whiten_forward", &masked_whiten_forward);
  m.impl("masked_whiten_backward", &masked_whiten_backward);
}

}  // namespace fastrlhf
