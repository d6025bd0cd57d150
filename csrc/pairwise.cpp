// Pairwise losses on CPU: fastrlhf.pairwise_sigmoid_loss, fastrlhf.dpo_loss and fastrlhf.reward_model_loss
// (semantics in fastrlhf/ops/pairwise.py; the Triton kernels in fastrlhf/kernels/pairwise.py mirror this).
//
// Every op reduces to pairs (u, v, m): u and v are the chosen and rejected rewards before the reward scale
// (DPO: policy minus reference log-probs), m the margin, h = u - v - m the logit. finish_pairs computes each
// pair's loss and its slope d loss / d h in fp32 (fp64 for fp64) with one stable formula per loss type,
// sums the loss and the statistics, and stores per-pair gradient factors d L / d u and d L / d v, so the
// backward is a multiply (pair ops) or a scatter (reward model). The reward model first pools each row at
// its last unmasked token with a backward scan that stops there.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"

namespace fastrlhf {
namespace {

// Codes shared with fastrlhf/ops/pairwise.py (LOSS_TYPES, REDUCTIONS, STATS).
enum LossType : int64_t { SIGMOID = 0, IPO = 1, HINGE = 2, ROBUST = 3 };
enum Reduction : int64_t { NONE = 0, MEAN = 1, SUM = 2 };
enum Stat { ACCURACY, TIE_RATE, CHOSEN, REJECTED, MARGIN, LM_TOKENS, NUM_STATS };

struct Options {
  double beta, label_smoothing, rank_coef, center_coef, reward_scale;
  int64_t loss_type, reduction;
};

// log(1 + e^x): exact to the last bit for very negative x, never overflowing for large x.
template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

// 1 / (1 + e^-x), never forming e^y for a large positive y.
template <typename T>
inline T sigmoid(T x) {
  const T z = std::exp(-std::abs(x));
  return x >= 0 ? T(1) / (T(1) + z) : z / (T(1) + z);
}

template <typename T>
struct Terms {
  T loss, slope;  // a pair's loss and d loss / d h
};

// -logsigmoid(x) = softplus(-x); its slope -sigmoid(-x) tends to -1 for badly wrong pairs (never vanishes).
template <typename T>
inline Terms<T> pair_terms(T h, const Options& o) {
  const T beta = static_cast<T>(o.beta), eps = static_cast<T>(o.label_smoothing), x = beta * h;
  switch (o.loss_type) {
    case IPO: {
      const T e = h - T(1) / (T(2) * beta);
      return {e * e, T(2) * e};
    }
    case HINGE:
      return {std::max(T(1) - x, T(0)), x < T(1) ? -beta : T(0)};
    case ROBUST: {
      const T denom = T(1) - T(2) * eps;
      return {((T(1) - eps) * softplus(-x) - eps * softplus(x)) / denom,
              -beta * ((T(1) - eps) * sigmoid(-x) + eps * sigmoid(x)) / denom};
    }
    default:  // SIGMOID, conservative label smoothing
      return {(T(1) - eps) * softplus(-x) + eps * softplus(x), beta * (eps - sigmoid(-x))};
  }
}

// Loss, statistics and gradient factors of n pairs; pair(i) returns {u, v, m}. Sums are float64 and
// sequential, so the result does not depend on the number of threads.
template <typename T, typename Pair>
void finish_pairs(int64_t n, const Options& o, Pair pair, T* loss, T* stats, T* factors) {
  const T w = o.reduction == MEAN ? T(1) / static_cast<T>(n) : T(1);
  const T rank = static_cast<T>(o.rank_coef), center = static_cast<T>(o.center_coef);
  const T scale = static_cast<T>(o.reward_scale);
  double total = 0, sums[NUM_STATS] = {};
  for (int64_t i = 0; i < n; ++i) {
    const auto [u, v, m] = pair(i);
    const Terms<T> t = pair_terms<T>(u - v - m, o);
    const T both = u + v;
    const T l = rank * t.loss + (center != T(0) ? center * both * both : T(0));
    if (o.reduction == NONE) loss[i] = l;
    total += l;
    const T shared = center != T(0) ? T(2) * center * both : T(0);
    factors[i] = w * (rank * t.slope + shared);
    factors[n + i] = w * (shared - rank * t.slope);
    const T chosen = scale * u, rejected = scale * v;
    sums[ACCURACY] += chosen > rejected ? 1.0 : chosen == rejected ? 0.5 : 0.0;
    sums[TIE_RATE] += chosen == rejected;
    sums[CHOSEN] += chosen;
    sums[REJECTED] += rejected;
    sums[MARGIN] += chosen - rejected;
  }
  if (o.reduction != NONE) loss[0] = static_cast<T>(total * w);
  for (int k = 0; k < LM_TOKENS; ++k) stats[k] = static_cast<T>(sums[k] / n);
  stats[LM_TOKENS] = 0;
}

template <typename scalar_t>
const scalar_t* data_or_null(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t) return nullptr;
  check_like(*t, like, name);
  check_dtype(*t, like.scalar_type(), name);
  return t->data_ptr<scalar_t>();
}

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating dtype, got ", t.scalar_type());
}

// The accumulation dtype of the outputs and of the saved factors: fp64 for fp64 inputs, else fp32.
void check_acc_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected dtype float or double, got ", t.scalar_type());
}

void check_outputs(const at::Tensor& loss, const at::Tensor& stats, const at::Tensor& factors, int64_t n,
                   int64_t loss_numel, at::ScalarType acc) {
  check_flat(loss, acc, loss_numel, "loss");
  check_flat(stats, acc, NUM_STATS, "stats");
  check_flat(factors, acc, 2 * n, "factors");
}

void pairwise_forward(const at::Tensor& chosen, const at::Tensor& rejected,
                      const c10::optional<at::Tensor>& ref_chosen, const c10::optional<at::Tensor>& ref_rejected,
                      const c10::optional<at::Tensor>& margin, double beta, double label_smoothing,
                      int64_t loss_type, int64_t reduction, double reward_scale, at::Tensor& loss,
                      at::Tensor& stats, at::Tensor& factors) {
  check_cpu_contiguous(chosen, "chosen");
  check_floating(chosen, "chosen");
  check_like(rejected, chosen, "rejected");
  check_dtype(rejected, chosen.scalar_type(), "rejected");
  const int64_t n = chosen.numel();
  TORCH_CHECK(n > 0, "chosen: expected at least one pair");
  TORCH_CHECK(loss_type >= SIGMOID && loss_type <= ROBUST, "loss_type: expected a code in [0, 3], got ", loss_type);
  TORCH_CHECK(reduction >= NONE && reduction <= SUM, "reduction: expected a code in [0, 2], got ", reduction);
  const Options o{beta, label_smoothing, 1.0, 0.0, reward_scale, loss_type, reduction};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chosen.scalar_type(), "pairwise_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    check_outputs(loss, stats, factors, n, reduction == NONE ? n : 1, c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t* a = chosen.data_ptr<scalar_t>();
    const scalar_t* b = rejected.data_ptr<scalar_t>();
    const scalar_t* ra = data_or_null<scalar_t>(ref_chosen, chosen, "ref_chosen");
    const scalar_t* rb = data_or_null<scalar_t>(ref_rejected, chosen, "ref_rejected");
    const scalar_t* m = data_or_null<scalar_t>(margin, chosen, "margin");
    auto read = [](const scalar_t* p, int64_t i) { return p ? static_cast<acc_t>(p[i]) : acc_t(0); };
    auto pair = [&](int64_t i) {
      return std::array<acc_t, 3>{static_cast<acc_t>(a[i]) - read(ra, i), static_cast<acc_t>(b[i]) - read(rb, i),
                                  read(m, i)};
    };
    finish_pairs<acc_t>(n, o, pair, loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), factors.data_ptr<acc_t>());
  });
}

// The last set element of a row of bools, or -1: a backward scan, 8 bytes at a time over padding.
inline int64_t last_set(const bool* mask, int64_t length) {
  int64_t t = length;
  uint64_t word;
  while (t >= 8 && (std::memcpy(&word, mask + t - 8, 8), word == 0)) t -= 8;
  while (t > 0 && !mask[t - 1]) --t;
  return t - 1;
}

// Rows per task of at least ELEMENTS_PER_TASK elements (4 MiB of fp32): one parallel region per call, and
// none for small work. Waking a second thread costs ~10 us on an idle machine and was measured at ~20 ms
// on this shared 2-core one, while the work is memory-bound and gains at most 2x from it.
constexpr int64_t ELEMENTS_PER_TASK = 1 << 20;

int64_t rows_per_task(int64_t length, int64_t elements_per_task = ELEMENTS_PER_TASK) {
  return std::max<int64_t>(1, elements_per_task / std::max<int64_t>(length, 1));
}

template <typename scalar_t>
struct Side {
  const scalar_t* values;
  const bool* mask;
  int64_t length;
};

// One pass over the rows of both sides: each row's last unmasked position (-1: none) and the value there
// (NaN: none), and for the chosen side the sum and count of the log-probs under the mask (float64,
// selected so -inf at padding stays out).
template <typename scalar_t, typename logp_t, typename acc_t>
void pool_rows(const Side<scalar_t> (&sides)[2], const logp_t* logprobs, int64_t rows, int64_t* index, acc_t* pooled,
               double* lm_sums, double* lm_counts) {
  // Without log-probs a row costs a short backward scan of its mask, not a full pass.
  const int64_t grain = rows_per_task(sides[0].length, logprobs ? ELEMENTS_PER_TASK : 4 * ELEMENTS_PER_TASK);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      for (int side = 0; side < 2; ++side) {
        const int64_t length = sides[side].length;
        const int64_t t = last_set(sides[side].mask + b * length, length);
        index[side * rows + b] = t;
        pooled[side * rows + b] = t >= 0 ? static_cast<acc_t>(sides[side].values[b * length + t])
                                         : std::numeric_limits<acc_t>::quiet_NaN();
      }
      if (!logprobs) continue;
      const int64_t length = sides[0].length;
      const bool* keep = sides[0].mask + b * length;
      const logp_t* x = logprobs + b * length;
      double sum = 0, count = 0;
      for (int64_t t = 0; t < length; ++t) {
        sum += keep[t] ? static_cast<double>(x[t]) : 0.0;
        count += keep[t];
      }
      lm_sums[b] = sum;
      lm_counts[b] = count;
    }
  });
}

void check_side(const at::Tensor& values, const at::Tensor& mask, int64_t rows, const char* name,
                const char* mask_name) {
  check_cpu_contiguous(values, name);
  check_floating(values, name);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == rows, name, ": expected shape [", rows, ", T], got ",
              values.sizes());
  check_like(mask, values, mask_name);
  check_dtype(mask, at::kBool, mask_name);
}

void reward_model_forward(const at::Tensor& chosen_values, const at::Tensor& rejected_values,
                          const at::Tensor& chosen_mask, const at::Tensor& rejected_mask,
                          const c10::optional<at::Tensor>& margin, const c10::optional<at::Tensor>& chosen_logprobs,
                          double rank_coef, double center_coef, double lm_coef, at::Tensor& loss, at::Tensor& stats,
                          at::Tensor& factors, at::Tensor& index) {
  TORCH_CHECK(chosen_values.dim() == 2 && chosen_values.size(0) > 0,
              "chosen_values: expected shape [B, T] with B >= 1, got ", chosen_values.sizes());
  const int64_t n = chosen_values.size(0);
  check_side(chosen_values, chosen_mask, n, "chosen_values", "chosen_mask");
  check_side(rejected_values, rejected_mask, n, "rejected_values", "rejected_mask");
  check_dtype(rejected_values, chosen_values.scalar_type(), "rejected_values");
  check_flat(index, at::kLong, 2 * n, "index");
  if (margin) check_flat(*margin, chosen_values.scalar_type(), n, "margin");
  if (chosen_logprobs) {
    check_like(*chosen_logprobs, chosen_values, "chosen_logprobs");
    check_floating(*chosen_logprobs, "chosen_logprobs");
  }
  const Options o{1.0, 0.0, rank_coef, center_coef, 1.0, SIGMOID, MEAN};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chosen_values.scalar_type(), "reward_model_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using values_t = scalar_t;
    check_outputs(loss, stats, factors, n, 1, c10::CppTypeToScalarType<acc_t>::value);
    const Side<values_t> sides[2] = {
        {chosen_values.data_ptr<values_t>(), chosen_mask.data_ptr<bool>(), chosen_values.size(1)},
        {rejected_values.data_ptr<values_t>(), rejected_mask.data_ptr<bool>(), rejected_values.size(1)}};
    std::vector<acc_t> pooled(2 * n);
    std::vector<double> lm_sums(n), lm_counts(n);
    int64_t* idx = index.data_ptr<int64_t>();
    if (chosen_logprobs) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chosen_logprobs->scalar_type(), "pool_rows", [&] {
        pool_rows<values_t>(sides, chosen_logprobs->data_ptr<scalar_t>(), n, idx, pooled.data(), lm_sums.data(),
                            lm_counts.data());
      });
    } else {
      pool_rows<values_t, values_t>(sides, nullptr, n, idx, pooled.data(), nullptr, nullptr);
    }
    const scalar_t* m = margin ? margin->data_ptr<scalar_t>() : nullptr;
    auto pair = [&](int64_t i) {
      return std::array<acc_t, 3>{pooled[i], pooled[n + i], m ? static_cast<acc_t>(m[i]) : acc_t(0)};
    };
    acc_t* out_loss = loss.data_ptr<acc_t>();
    finish_pairs<acc_t>(n, o, pair, out_loss, stats.data_ptr<acc_t>(), factors.data_ptr<acc_t>());
    if (chosen_logprobs) {
      double sum = 0, count = 0;
      for (int64_t b = 0; b < n; ++b) sum += lm_sums[b], count += lm_counts[b];
      out_loss[0] += static_cast<acc_t>(-lm_coef * sum / count);
      stats.data_ptr<acc_t>()[LM_TOKENS] = static_cast<acc_t>(count);
    }
  });
}

// Row b of each side's values' gradient: zero but at the pooled token; of the chosen log-probs:
// -lm_coef * grad / tokens where the chosen mask is set. One parallel region over the rows.
template <typename values_t, typename logp_t, typename acc_t>
void scatter_rows(acc_t g, const acc_t* factors, const int64_t* index, const bool* chosen_mask, acc_t lm_weight,
                  at::Tensor& grad_chosen, at::Tensor& grad_rejected, logp_t* grad_logprobs) {
  const int64_t rows = grad_chosen.size(0);
  values_t* outs[2] = {grad_chosen.data_ptr<values_t>(), grad_rejected.data_ptr<values_t>()};
  const int64_t lengths[2] = {grad_chosen.size(1), grad_rejected.size(1)};
  at::parallel_for(0, rows, rows_per_task(lengths[0] + lengths[1]), [&](int64_t first, int64_t last) {
    for (int side = 0; side < 2; ++side) {
      values_t* o = outs[side];
      const int64_t length = lengths[side];
      std::memset(o + first * length, 0, (last - first) * length * sizeof(values_t));  // all-zero bits: +0.0
      for (int64_t b = first; b < last; ++b) {
        const int64_t t = index[side * rows + b];
        if (t >= 0) o[b * length + t] = static_cast<values_t>(g * factors[side * rows + b]);
      }
    }
    if (!grad_logprobs) return;
    const logp_t w = static_cast<logp_t>(lm_weight);
    for (int64_t t = first * lengths[0]; t < last * lengths[0]; ++t) grad_logprobs[t] = chosen_mask[t] ? w : logp_t(0);
  });
}

void reward_model_backward(const at::Tensor& grad_loss, const at::Tensor& factors, const at::Tensor& index,
                           const at::Tensor& stats, const at::Tensor& chosen_mask, double lm_coef, bool has_lm,
                           at::Tensor& grad_chosen, at::Tensor& grad_rejected, at::Tensor& grad_logprobs) {
  TORCH_CHECK(grad_chosen.dim() == 2, "grad_chosen: expected shape [B, T], got ", grad_chosen.sizes());
  const int64_t n = grad_chosen.size(0);
  check_side(grad_chosen, chosen_mask, n, "grad_chosen", "chosen_mask");
  check_cpu_contiguous(grad_rejected, "grad_rejected");
  TORCH_CHECK(grad_rejected.dim() == 2 && grad_rejected.size(0) == n, "grad_rejected: expected shape [", n,
              ", T], got ", grad_rejected.sizes());
  check_dtype(grad_rejected, grad_chosen.scalar_type(), "grad_rejected");
  if (has_lm) {
    check_like(grad_logprobs, grad_chosen, "grad_logprobs");
    check_floating(grad_logprobs, "grad_logprobs");
  }
  check_acc_dtype(factors, "factors");
  check_flat(factors, factors.scalar_type(), 2 * n, "factors");
  check_flat(grad_loss, factors.scalar_type(), 1, "grad_loss");
  check_flat(stats, factors.scalar_type(), NUM_STATS, "stats");
  // The pooled positions become addresses: each must be -1 (no token) or inside its side's row.
  check_flat(index, at::kLong, 2 * n, "index");
  const int64_t* positions = index.data_ptr<int64_t>();
  for (int side = 0; side < 2; ++side) {
    const int64_t length = (side == 0 ? grad_chosen : grad_rejected).size(1);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t t = positions[side * n + b];
      TORCH_CHECK(t >= -1 && t < length, "index: expected positions in [-1, ", length, ") for the ",
                  side == 0 ? "chosen" : "rejected", " side, got ", t, " at row ", b);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(factors.scalar_type(), "reward_model_backward", [&] {
    using acc_t = scalar_t;
    const acc_t g = grad_loss.item<acc_t>();
    const acc_t lm_weight = has_lm ? static_cast<acc_t>(-lm_coef) * g / stats.data_ptr<acc_t>()[LM_TOKENS] : acc_t(0);
    const acc_t* f = factors.data_ptr<acc_t>();
    const int64_t* idx = index.data_ptr<int64_t>();
    const bool* keep = chosen_mask.data_ptr<bool>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_chosen.scalar_type(), "scatter_rows", [&] {
      using values_t = scalar_t;
      if (!has_lm) {
        scatter_rows<values_t, values_t>(g, f, idx, keep, lm_weight, grad_chosen, grad_rejected, nullptr);
        return;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_logprobs.scalar_type(), "lm", [&] {
        scatter_rows<values_t, scalar_t>(g, f, idx, keep, lm_weight, grad_chosen, grad_rejected,
                                         grad_logprobs.data_ptr<scalar_t>());
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def(
      "pairwise_forward(Tensor chosen, Tensor rejected, Tensor? ref_chosen, Tensor? ref_rejected, Tensor? margin, "
      "float beta, float label_smoothing, int loss_type, int reduction, float reward_scale, Tensor(a!) loss, "
      "Tensor(b!) stats, Tensor(c!) factors) -> ()");
  m.def(
      "reward_model_forward(Tensor chosen_values, Tensor rejected_values, Tensor chosen_mask, Tensor rejected_mask, "
      "Tensor? margin, Tensor? chosen_logprobs, float rank_coef, float center_coef, float lm_coef, Tensor(a!) loss, "
      "Tensor(b!) stats, Tensor(c!) factors, Tensor(d!) index) -> ()");
  m.def(
      "reward_model_backward(Tensor grad_loss, Tensor factors, Tensor index, Tensor stats, Tensor chosen_mask, "
      "float lm_coef, bool has_lm, Tensor(a!) grad_chosen, Tensor(b!) grad_rejected, Tensor(c!) grad_logprobs) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) {
  m.impl("pairwise_forward", &pairwise_forward);
  m.impl("reward_model_forward", &reward_model_forward);
  m.impl("reward_model_backward", &reward_model_backward);
}

}  // namespace fastrlhf
