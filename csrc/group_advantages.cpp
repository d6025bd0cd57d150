// group_advantages on CPU (see fastrlhf/ops/group_advantages.py for the semantics).
//
// Token input [B, T] takes three steps: (1) one parallel pass over the rows reads rewards and mask once
// and leaves each row's score and length (double); (2) the grouping and the statistics, on B numbers
// only; (3) one parallel pass reads the mask again and writes the output once. Step (2) groups by
// sorting (group id, row) pairs, O(B log B) on B numbers (a whole [B] call takes under 1 ms at
// B = 8192, the token passes several ms); any int64 ids work, and each group's members come out in row
// order, so a group's statistics are summed in an order that depends on its members only
// (bit-identical results whatever other groups share the batch, and whatever the thread count).
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"

namespace fastrlhf {
namespace {

enum class Estimator { GRPO, RLOO, REINFORCE_PP_BASELINE, OPO };
enum class Scale { GROUP, BATCH, NONE };
enum class Singleton { RAW, ZERO, ERROR };

Estimator parse_estimator(const std::string& s) {
  if (s == "grpo") return Estimator::GRPO;
  if (s == "rloo") return Estimator::RLOO;
  if (s == "reinforce++-baseline") return Estimator::REINFORCE_PP_BASELINE;
  if (s == "opo") return Estimator::OPO;
  TORCH_CHECK_VALUE(false, "estimator: expected one of ('grpo', 'rloo', 'reinforce++-baseline', 'opo'), got '", s, "'");
}

Scale parse_scale(const std::string& s) {
  if (s == "group") return Scale::GROUP;
  if (s == "batch") return Scale::BATCH;
  if (s == "none") return Scale::NONE;
  TORCH_CHECK_VALUE(false, "scale: expected one of ('group', 'batch', 'none'), got '", s, "'");
}

Singleton parse_singleton(const std::string& s) {
  if (s == "raw") return Singleton::RAW;
  if (s == "zero") return Singleton::ZERO;
  if (s == "error") return Singleton::ERROR;
  TORCH_CHECK_VALUE(false, "singleton: expected one of ('raw', 'zero', 'error'), got '", s, "'");
}

bool parse_nan(const std::string& s) {
  TORCH_CHECK_VALUE(s == "propagate" || s == "ignore", "nan: expected one of ('propagate', 'ignore'), got '", s, "'");
  return s == "ignore";
}

constexpr int WIDTH = 8;
// Rows per task of the token passes: 16 rows of T = 1024 fp32 are 64 KiB of rewards.
constexpr int64_t ROW_GRAIN = 16;

// Step (1): each row's score (the sum of its rewards at masked-in tokens) and length. WIDTH independent
// partial sums per row, added in a fixed order: vector adds, and the same bits for every thread count.
// Every load is unconditional, then selected, so garbage (NaN) outside the mask never reaches a sum.
template <typename scalar_t>
void row_sums(const scalar_t* rewards, const uint8_t* mask, int64_t rows, int64_t T, double* score, double* length) {
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const scalar_t* r = rewards + b * T;
      const uint8_t* m = mask + b * T;
      double acc[WIDTH] = {};
      int64_t count[WIDTH] = {};
      int64_t t = 0;
      for (; t + WIDTH <= T; t += WIDTH) {
        for (int w = 0; w < WIDTH; ++w) {
          acc[w] += m[t + w] ? static_cast<double>(r[t + w]) : 0.0;
          count[w] += m[t + w];
        }
      }
      for (; t < T; ++t) {
        acc[0] += m[t] ? static_cast<double>(r[t]) : 0.0;
        count[0] += m[t];
      }
      double s = 0.0;
      int64_t n = 0;
      for (int w = 0; w < WIDTH; ++w) {
        s += acc[w];
        n += count[w];
      }
      score[b] = s;
      length[b] = static_cast<double>(n);
    }
  });
}

// Step (3): the row's advantage at every masked-in token, 0 elsewhere (a select the compiler vectorises).
template <typename out_t>
void broadcast(const uint8_t* mask, int64_t rows, int64_t T, const double* advantage, out_t* out) {
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const out_t a = static_cast<out_t>(advantage[b]);
      const uint8_t* m = mask + b * T;
      out_t* y = out + b * T;
      for (int64_t t = 0; t < T; ++t) y[t] = m[t] ? a : out_t(0);
    }
  });
}

// (group id, row) pairs sorted: each group is a run, its members in row order.
template <typename index_t>
std::vector<std::pair<int64_t, int64_t>> sorted_groups(const at::Tensor& index) {
  const index_t* id = index.data_ptr<index_t>();
  const int64_t rows = index.numel();
  std::vector<std::pair<int64_t, int64_t>> order(rows);
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK_VALUE(id[b] >= 0, "index: expected non-negative group ids, got ", id[b], " at row ", b);
    order[b] = {static_cast<int64_t>(id[b]), b};
  }
  std::sort(order.begin(), order.end());
  return order;
}

// a / d, with 0 for 0 / 0 (a group without spread and eps = 0 has no signal); NaN stays NaN.
double divide(double a, double d) { return d == 0.0 ? (std::isnan(a) ? a : 0.0) : a / d; }

struct Options {
  Estimator estimator;
  Scale scale;
  Singleton singleton;
  bool ignore_nan;
  bool unbiased;
  double eps;
};

// Moments of `value` over the rows with weight > 0: {sum of weights, mean, sum of weighted squared
// deviations}, two passes in double, rows in order.
std::array<double, 3> moments(const std::vector<double>& value, const std::vector<double>& weight) {
  double total = 0.0, sum = 0.0;
  for (size_t i = 0; i < value.size(); ++i) {
    if (weight[i] > 0) {
      total += weight[i];
      sum += weight[i] * value[i];
    }
  }
  const double mean = sum / total;
  double m2 = 0.0;
  for (size_t i = 0; i < value.size(); ++i) {
    if (weight[i] > 0) m2 += weight[i] * (value[i] - mean) * (value[i] - mean);
  }
  return {total, mean, m2};
}

// Step (2): every row's advantage (before the batch whitening of reinforce++-baseline) and its weight
// in that whitening (its length; 0 for rows whose advantage is 0 by rule: ignored NaN, zeroed singleton).
void group_statistics(const std::vector<std::pair<int64_t, int64_t>>& order, const double* score,
                      const double* length, const Options& o, double batch_std, double* advantage, double* weight) {
  const int64_t rows = static_cast<int64_t>(order.size());
  auto valid = [&](int64_t row) { return !(o.ignore_nan && std::isnan(score[row])); };
  for (int64_t begin = 0; begin < rows;) {
    int64_t end = begin + 1;
    while (end < rows && order[end].first == order[begin].first) ++end;
    int64_t n = 0, first_valid = -1;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t row = order[k].second;
      advantage[row] = 0.0;
      weight[row] = 0.0;
      if (valid(row)) {
        if (first_valid < 0) first_valid = row;
        ++n;
      }
    }
    if (n == 1) {
      TORCH_CHECK_VALUE(o.singleton != Singleton::ERROR, "singleton: group ", order[begin].first,
                        " has one scored member (row ", first_valid, ") and singleton='error'");
      const double s = score[first_valid];
      if (o.singleton == Singleton::ZERO) {
        advantage[first_valid] = s - s;  // 0, or NaN for a non-finite score
      } else {
        // verl's loop: mean 0 and std 1 for a group of one
        const double spread = o.scale == Scale::BATCH ? batch_std : 1.0;
        const bool scaled = o.estimator == Estimator::GRPO && o.scale != Scale::NONE;
        advantage[first_valid] = scaled ? divide(s, spread + o.eps) : s;
        weight[first_valid] = length[first_valid];
      }
    } else if (n > 1) {
      // Shifted by a member: a group of equal scores has deviations of exactly 0.
      const double shift = score[first_valid];
      const bool weighted = o.estimator == Estimator::OPO;
      double sum = 0.0, total = 0.0;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t row = order[k].second;
        if (!valid(row)) continue;
        const double w = weighted ? length[row] : 1.0;
        sum += w * (score[row] - shift);
        total += w;
      }
      const double base = total == 0.0 ? 0.0 : sum / total;
      double factor = 1.0;  // the advantage is factor * (s - baseline), divided by `spread`
      double spread = 1.0;
      if (o.estimator == Estimator::RLOO) factor = static_cast<double>(n) / static_cast<double>(n - 1);
      if (o.estimator == Estimator::GRPO && o.scale == Scale::GROUP) {
        double m2 = 0.0;
        for (int64_t k = begin; k < end; ++k) {
          const int64_t row = order[k].second;
          if (!valid(row)) continue;
          const double d = (score[row] - shift) - base;
          m2 += d * d;
        }
        spread = std::sqrt(m2 / static_cast<double>(n - (o.unbiased ? 1 : 0))) + o.eps;
      } else if (o.estimator == Estimator::GRPO && o.scale == Scale::BATCH) {
        spread = batch_std + o.eps;
      }
      for (int64_t k = begin; k < end; ++k) {
        const int64_t row = order[k].second;
        if (!valid(row)) continue;
        advantage[row] = divide(factor * ((score[row] - shift) - base), spread);
        weight[row] = length[row];
      }
    }
    begin = end;
  }
}

// The std of the scores in the call (rows with a NaN score left out when nan = "ignore").
double batch_std(const double* score, int64_t rows, const Options& o) {
  std::vector<double> value(score, score + rows), weight(rows);
  for (int64_t b = 0; b < rows; ++b) weight[b] = (o.ignore_nan && std::isnan(score[b])) ? 0.0 : 1.0;
  const auto [count, mean, m2] = moments(value, weight);
  (void)mean;
  return std::sqrt(m2 / (count - (o.unbiased ? 1.0 : 0.0)));
}

// reinforce++-baseline: whiten the advantages over the masked-in tokens of the weighted rows (verl's
// masked_whiten: mean, unbiased variance, rsqrt(var + 1e-8)); rows of weight 0 keep their value.
void whiten(std::vector<double>& advantage, const std::vector<double>& weight) {
  const auto [count, mean, m2] = moments(advantage, weight);
  TORCH_CHECK_VALUE(count >= 2, "mask: reinforce++-baseline whitens over the masked-in tokens of the scored rows, "
                    "expected at least 2, got ", count);
  const double rstd = 1.0 / std::sqrt(m2 / (count - 1.0) + 1e-8);
  for (size_t i = 0; i < advantage.size(); ++i) {
    if (weight[i] > 0) advantage[i] = (advantage[i] - mean) * rstd;
  }
}

void group_advantages(const at::Tensor& scores, const at::Tensor& index, const c10::optional<at::Tensor>& mask,
                      const std::string& estimator, const std::string& scale, double eps, bool unbiased,
                      const std::string& singleton, const std::string& nan, at::Tensor& out) {
  const Options o{parse_estimator(estimator), parse_scale(scale), parse_singleton(singleton), parse_nan(nan),
                  unbiased, eps};
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected a value >= 0, got ", eps);
  check_cpu_contiguous(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 1 || scores.dim() == 2, "scores: expected [B] or [B, T], got shape ",
                    scores.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "scores: expected a floating dtype, got ",
                   scores.scalar_type());
  const int64_t rows = scores.size(0);
  const int64_t T = scores.dim() == 2 ? scores.size(1) : 1;
  check_cpu_contiguous(index, "index");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
                   "index: expected dtype int32 or int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == rows, "index: expected shape [", rows, "], got ",
                    index.sizes());
  if (scores.dim() == 2) {
    TORCH_CHECK_VALUE(mask.has_value(), "mask: expected a [B, T] bool mask with [B, T] scores, got None");
    check_like(*mask, scores, "mask");
    check_dtype(*mask, at::kBool, "mask");
  } else {
    TORCH_CHECK_VALUE(!mask.has_value(), "mask: expected None with [B] scores (a mask goes with [B, T] token rewards)");
    TORCH_CHECK_VALUE(o.estimator != Estimator::REINFORCE_PP_BASELINE && o.estimator != Estimator::OPO,
                      "scores: estimator '", estimator, "' needs [B, T] token rewards with a mask, got shape ",
                      scores.sizes());
  }
  check_like(out, scores, "out");
  check_dtype(out, scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, "out");

  std::vector<double> score(rows), length(rows, 1.0);
  const uint8_t* m = mask ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_advantages", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    if (m) {
      row_sums(s, m, rows, T, score.data(), length.data());
    } else {
      for (int64_t b = 0; b < rows; ++b) score[b] = static_cast<double>(s[b]);
    }
  });
  const auto order = index.scalar_type() == at::kInt ? sorted_groups<int32_t>(index) : sorted_groups<int64_t>(index);
  const bool batch_scaled = o.estimator == Estimator::GRPO && o.scale == Scale::BATCH;
  const double spread = batch_scaled ? batch_std(score.data(), rows, o) : 1.0;
  std::vector<double> advantage(rows), weight(rows);
  group_statistics(order, score.data(), length.data(), o, spread, advantage.data(), weight.data());
  if (o.estimator == Estimator::REINFORCE_PP_BASELINE) whiten(advantage, weight);

  if (out.scalar_type() == at::kDouble) {
    double* y = out.data_ptr<double>();
    if (m) broadcast(m, rows, T, advantage.data(), y);
    else std::copy(advantage.begin(), advantage.end(), y);
  } else {
    float* y = out.data_ptr<float>();
    if (m) broadcast(m, rows, T, advantage.data(), y);
    else for (int64_t b = 0; b < rows; ++b) y[b] = static_cast<float>(advantage[b]);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def("group_advantages(Tensor scores, Tensor index, Tensor? mask, str estimator, str scale, float eps, "
        "bool unbiased, str singleton, str nan, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) { m.impl("group_advantages", &group_advantages); }

}  // namespace fastrlhf
