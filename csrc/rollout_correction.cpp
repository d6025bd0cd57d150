// The train/inference mismatch correction on CPU: fastrlhf.rollout_correction (semantics in
// fastrlhf/ops/rollout_correction.py; the Triton kernels in fastrlhf/kernels/rollout_correction.py compute
// the same).
//
// One task per sequence (at::parallel_for over sequences): when a sequence-level quantity is needed
// (sequence-level IS weight or a seq_* rejection option) a first pass over the sequence's tokens sums the
// log-ratio and the k1/k2/k3 statistics; then one pass writes each token's weight and kept flag and the
// sequence's partial sums of the metrics. The sequence's tokens are still in cache for the second pass.
// The partial sums of the sequences are combined in sequence order (float64), so results do not depend
// on the number of threads.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "sequences.h"

namespace fastrlhf {
namespace {

// Codes shared with fastrlhf/ops/rollout_correction.py (IS_LEVELS, RS_LEVELS, PARTIALS, METRICS).
enum IsLevel : int64_t { IS_NONE, IS_TOKEN, IS_SEQUENCE };
enum RsLevel { RS_TOKEN, RS_SUM, RS_MEAN, RS_MAX, NUM_RS_LEVELS };
enum Partial { TOKENS, WEIGHT_SUM, WEIGHT_MIN, WEIGHT_MAX, CLIPPED, REJECTED, REJECTED_SEQUENCE, NUM_PARTIALS };
constexpr int NUM_METRICS = 6;
// rs_bounds per level: k1's lower and upper bound (log space), k2's and k3's upper bound.
constexpr int BOUNDS_PER_LEVEL = 4;

struct Options {
  int64_t is_level;
  bool is_window;  // IcePop: zero weights outside [is_lo, is_hi]; else truncate at is_hi (TIS)
  double is_lo, is_hi;
  int64_t rs_flags;  // bit 3 * level + kind (k1, k2, k3): the option is on
  double bounds[NUM_RS_LEVELS * BOUNDS_PER_LEVEL];
};

// Whether the k1/k2/k3 statistics pass the options of one level (NaN fails every option that reads it).
template <typename T>
inline bool passes(T k1, T k2, T k3, const Options& o, int level) {
  const int64_t flags = o.rs_flags >> (3 * level);
  const double* b = o.bounds + BOUNDS_PER_LEVEL * level;
  return (!(flags & 1) || (k1 >= b[0] && k1 <= b[1])) && (!(flags & 2) || k2 <= b[2]) &&
         (!(flags & 4) || k3 <= b[3]);
}

// One sequence, tokens [begin, end): both passes, its outputs and its partial sums. Per-token arithmetic
// in T (fp32, fp64 for fp64), sums in double: a sequence-level weight is exp of a sum of thousands of terms.
template <typename scalar_t>
void sequence(const scalar_t* old, const scalar_t* rollout, const bool* mask, int64_t begin, int64_t end,
              const Options& o, bool sequence_pass, float* weights, bool* kept, double* partials) {
  using T = at::opmath_type<scalar_t>;
  const double inf = std::numeric_limits<double>::infinity();
  const T bound = T(20);
  bool seq_ok = true;
  T seq_weight = T(1);
  if (sequence_pass) {
    double count = 0, log_ratio = 0, k1 = 0, k2 = 0, k3 = 0, max_k2 = -inf, max_k3 = -inf;
    for (int64_t i = begin; i < end; ++i) {
      if (!mask[i]) continue;  // never read: NaN or inf at a masked token changes nothing
      const T d = static_cast<T>(old[i]) - static_cast<T>(rollout[i]), safe = clamp(d, -bound, bound);
      const T t2 = T(0.5) * safe * safe, t3 = std::exp(safe) - T(1) - safe;
      count += 1;
      log_ratio += d;
      k1 -= safe;
      k2 += t2;
      k3 += t3;
      // NaN-propagating maxima: a NaN statistic rejects the sequence, as in the reference.
      max_k2 = (t2 > max_k2 || std::isnan(t2)) ? t2 : max_k2;
      max_k3 = (t3 > max_k3 || std::isnan(t3)) ? t3 : max_k3;
    }
    if (count == 0) max_k2 = max_k3 = 0;
    const double n = std::max(count, 1.0);
    seq_ok = passes(k1, k2, k3, o, RS_SUM) && passes(k1 / n, k2 / n, k3 / n, o, RS_MEAN) &&
             passes(0.0, max_k2, max_k3, o, RS_MAX);
    seq_weight = std::exp(static_cast<T>(clamp(log_ratio, -20.0, 20.0)));
  }
  double sums[NUM_PARTIALS] = {};
  sums[WEIGHT_MIN] = inf;
  sums[WEIGHT_MAX] = -inf;
  for (int64_t i = begin; i < end; ++i) {
    if (!mask[i]) {
      weights[i] = 0.0f;
      kept[i] = false;
      continue;
    }
    const T safe = clamp(static_cast<T>(old[i]) - static_cast<T>(rollout[i]), -bound, bound);
    const T e = std::exp(safe);
    const T w = o.is_level == IS_TOKEN ? e : (o.is_level == IS_SEQUENCE ? seq_weight : T(1));
    bool clipped = false;
    T corrected = w;
    if (o.is_level != IS_NONE) {
      // Selected, not min/max: a NaN weight stays NaN.
      clipped = o.is_window ? (w < o.is_lo || w > o.is_hi) : w > o.is_hi;
      corrected = clipped ? (o.is_window ? T(0) : static_cast<T>(o.is_hi)) : w;
    }
    const bool ok = seq_ok && passes(-safe, T(0.5) * safe * safe, e - T(1) - safe, o, RS_TOKEN);
    weights[i] = ok ? static_cast<float>(corrected) : 0.0f;
    kept[i] = ok;
    sums[TOKENS] += 1;
    sums[WEIGHT_SUM] += w;
    sums[WEIGHT_MIN] = (w < sums[WEIGHT_MIN] || std::isnan(w)) ? w : sums[WEIGHT_MIN];
    sums[WEIGHT_MAX] = (w > sums[WEIGHT_MAX] || std::isnan(w)) ? w : sums[WEIGHT_MAX];
    sums[CLIPPED] += clipped;
    sums[REJECTED] += !ok;
  }
  sums[REJECTED_SEQUENCE] = sums[REJECTED] > 0;
  std::copy(sums, sums + NUM_PARTIALS, partials);
}

// Combines the sequences' partial sums [S, NUM_PARTIALS] in sequence order into the metrics.
void finish(const double* partials, int64_t rows, float* metrics) {
  double s[NUM_PARTIALS] = {};
  s[WEIGHT_MIN] = std::numeric_limits<double>::infinity();
  s[WEIGHT_MAX] = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < rows; ++r, partials += NUM_PARTIALS) {
    for (int j : {TOKENS, WEIGHT_SUM, CLIPPED, REJECTED, REJECTED_SEQUENCE}) s[j] += partials[j];
    const double lo = partials[WEIGHT_MIN], hi = partials[WEIGHT_MAX];
    s[WEIGHT_MIN] = (lo < s[WEIGHT_MIN] || std::isnan(lo)) ? lo : s[WEIGHT_MIN];
    s[WEIGHT_MAX] = (hi > s[WEIGHT_MAX] || std::isnan(hi)) ? hi : s[WEIGHT_MAX];
  }
  const double norm = 1.0 / std::max(s[TOKENS], 1.0);
  const bool any = s[TOKENS] > 0;
  metrics[0] = static_cast<float>(s[WEIGHT_SUM] * norm);
  metrics[1] = static_cast<float>(any ? s[WEIGHT_MIN] : 0.0);
  metrics[2] = static_cast<float>(any ? s[WEIGHT_MAX] : 0.0);
  metrics[3] = static_cast<float>(s[CLIPPED] * norm);
  metrics[4] = static_cast<float>(s[REJECTED] * norm);
  metrics[5] = static_cast<float>(s[REJECTED_SEQUENCE] / rows);
}

void rollout_correction(const at::Tensor& old_logp, const at::Tensor& rollout_logp, const at::Tensor& mask,
                        const at::Tensor& offsets, int64_t is_level, bool is_window, double is_lo, double is_hi,
                        int64_t rs_flags, at::ArrayRef<double> rs_bounds, at::Tensor& weights, at::Tensor& kept,
                        at::Tensor& metrics) {
  check_cpu_contiguous(old_logp, "old_logp");
  const int64_t n = old_logp.numel();
  const int64_t* o = checked_offsets(offsets, 0, n);
  const int64_t rows = offsets.numel() - 1;
  TORCH_CHECK(o[rows] == n, "offsets: expected to end at ", n, ", got ", o[rows]);
  TORCH_CHECK(is_level >= IS_NONE && is_level <= IS_SEQUENCE, "is_level: unknown code ", is_level);
  TORCH_CHECK(rs_flags >= 0 && rs_flags < (1 << (3 * NUM_RS_LEVELS)), "rs_flags: unknown bits ", rs_flags);
  TORCH_CHECK(rs_bounds.size() == NUM_RS_LEVELS * BOUNDS_PER_LEVEL, "rs_bounds: expected ",
              NUM_RS_LEVELS * BOUNDS_PER_LEVEL, " values, got ", rs_bounds.size());
  const at::ScalarType dtype = old_logp.scalar_type();
  const bool* m = static_cast<const bool*>(data_or_null(mask, n, at::kBool, "mask"));
  float* w = static_cast<float*>(const_cast<void*>(data_or_null(weights, n, at::kFloat, "weights")));
  bool* k = static_cast<bool*>(const_cast<void*>(data_or_null(kept, n, at::kBool, "kept")));
  float* out = static_cast<float*>(const_cast<void*>(data_or_null(metrics, NUM_METRICS, at::kFloat, "metrics")));
  Options opt{is_level, is_window, is_lo, is_hi, rs_flags, {}};
  std::copy(rs_bounds.begin(), rs_bounds.end(), opt.bounds);
  const bool sequence_pass = is_level == IS_SEQUENCE || (rs_flags >> 3) != 0;
  std::vector<double> partials(rows * NUM_PARTIALS);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rollout_correction", [&] {
    const auto* old = static_cast<const scalar_t*>(old_logp.data_ptr());
    const auto* rollout = static_cast<const scalar_t*>(data_or_null(rollout_logp, n, dtype, "rollout_logp"));
    // Grain: about 32k tokens per task on average.
    const int64_t grain = std::max<int64_t>(1, rows * (int64_t(1) << 15) / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        sequence<scalar_t>(old, rollout, m, o[s], o[s + 1], opt, sequence_pass, w, k,
                           partials.data() + s * NUM_PARTIALS);
      }
    });
  });
  finish(partials.data(), rows, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def(
      "rollout_correction(Tensor old_logp, Tensor rollout_logp, Tensor mask, Tensor offsets, int is_level, "
      "bool is_window, float is_lo, float is_hi, int rs_flags, float[] rs_bounds, Tensor(a!) weights, "
      "Tensor(b!) kept, Tensor(c!) metrics) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) {
  m.impl("rollout_correction", &rollout_correction);
}

}  // namespace fastrlhf
