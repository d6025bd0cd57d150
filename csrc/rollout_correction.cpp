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
#include "logits.h"  // first: it picks the vector ISA

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

// Adds acc's lanes to sum in lane order, then zeroes acc.
template <typename T>
inline void add_lanes(double& sum, Vec<T>& acc) {
  T lanes[Vec<T>::size()];
  acc.store(lanes);
  for (int64_t j = 0; j < Vec<T>::size(); ++j) sum += lanes[j];
  acc = Vec<T>(0);
}

// A mask vector (all bits set) where the token-level options pass; NaN fails every option that reads it.
template <typename T>
inline Vec<T> passes_token(const Vec<T>& safe, const Vec<T>& t2, const Vec<T>& t3, const Options& o) {
  using V = Vec<T>;
  const int64_t flags = o.rs_flags >> (3 * RS_TOKEN);
  const double* b = o.bounds + BOUNDS_PER_LEVEL * RS_TOKEN;
  V ok = V(0) == V(0);
  if (flags & 1) ok = ok & (-safe >= V(static_cast<T>(b[0]))) & (-safe <= V(static_cast<T>(b[1])));
  if (flags & 2) ok = ok & (t2 <= V(static_cast<T>(b[2])));
  if (flags & 4) ok = ok & (t3 <= V(static_cast<T>(b[3])));
  return ok;
}

// One sequence, tokens [begin, end): both passes, its outputs and its partial sums, two vectors of T (fp32,
// fp64 for fp64) per step. Per-token arithmetic in T; sums in double (lanes are added every few steps): a
// sequence-level weight is exp of a sum of thousands of terms.
template <typename scalar_t>
void sequence(const scalar_t* old, const scalar_t* rollout, const bool* mask, int64_t begin, int64_t end,
              const Options& o, bool sequence_pass, float* weights, bool* kept, double* partials) {
  using T = acc_type<scalar_t>;
  using V = Vec<T>;
  constexpr int64_t L = V::size(), STEP = 2 * L, FLUSH = 4;  // steps between additions of lanes to doubles
  const V zero(0), one(1), bound(20), inf(std::numeric_limits<T>::infinity());
  // The last, partial step runs on copies padded with masked tokens.
  scalar_t old_tail[STEP], rollout_tail[STEP];
  bool mask_tail[STEP], kept_tail[STEP];
  float weights_tail[STEP];
  auto for_steps = [&](auto&& step) {
    int64_t i = begin;
    for (; i + STEP <= end; i += STEP) step(old + i, rollout + i, mask + i, weights + i, kept + i);
    if (i == end) return;
    const int64_t n = end - i;
    std::fill(std::copy(old + i, old + end, old_tail), old_tail + STEP, scalar_t(0));
    std::fill(std::copy(rollout + i, rollout + end, rollout_tail), rollout_tail + STEP, scalar_t(0));
    std::fill(std::copy(mask + i, mask + end, mask_tail), mask_tail + STEP, false);
    step(old_tail, rollout_tail, mask_tail, weights_tail, kept_tail);
    std::copy(weights_tail, weights_tail + n, weights + i);
    std::copy(kept_tail, kept_tail + n, kept + i);
  };
  // Per half step: the kept-token mask vector and the clamped log-ratio (0 at masked tokens, which are
  // selected away, never multiplied: NaN or inf there changes nothing).
  auto load = [&](const scalar_t* old_p, const scalar_t* rollout_p, const bool* mask_p, V (&m)[2], V (&d)[2]) {
    auto [old_lo, old_hi] = load_acc<scalar_t>(old_p);
    auto [rollout_lo, rollout_hi] = load_acc<scalar_t>(rollout_p);
    T lanes[STEP];
    for (int64_t j = 0; j < STEP; ++j) lanes[j] = mask_p[j] ? T(1) : T(0);
    m[0] = V::loadu(lanes) != zero;
    m[1] = V::loadu(lanes + L) != zero;
    d[0] = V::blendv(zero, old_lo - rollout_lo, m[0]);
    d[1] = V::blendv(zero, old_hi - rollout_hi, m[1]);
  };
  auto clamped = [&](const V& d) { return at::vec::minimum(at::vec::maximum(d, -bound), bound); };

  bool seq_ok = true;
  T seq_weight = T(1);
  if (sequence_pass) {
    double count = 0, log_ratio = 0, k1 = 0, k2 = 0, k3 = 0;
    V count_acc(0), log_ratio_acc(0), k1_acc(0), k2_acc(0), k3_acc(0), max_k2(-inf), max_k3(-inf);
    int64_t steps = 0;
    auto flush = [&] {
      add_lanes(count, count_acc), add_lanes(log_ratio, log_ratio_acc), add_lanes(k1, k1_acc);
      add_lanes(k2, k2_acc), add_lanes(k3, k3_acc);
    };
    for_steps([&](const scalar_t* old_p, const scalar_t* rollout_p, const bool* mask_p, float*, bool*) {
      V m[2], d[2];
      load(old_p, rollout_p, mask_p, m, d);
      for (int h = 0; h < 2; ++h) {
        const V safe = clamped(d[h]), t2 = V(T(0.5)) * safe * safe, t3 = safe.exp() - one - safe;
        count_acc += V::blendv(zero, one, m[h]);
        log_ratio_acc += d[h];
        k1_acc -= safe;
        k2_acc += t2;
        k3_acc += t3;
        // maximum propagates NaN: a NaN statistic rejects the sequence, as in the reference.
        max_k2 = at::vec::maximum(max_k2, V::blendv(-inf, t2, m[h]));
        max_k3 = at::vec::maximum(max_k3, V::blendv(-inf, t3, m[h]));
      }
      if (++steps % FLUSH == 0) flush();
    });
    flush();
    double largest_k2 = -std::numeric_limits<double>::infinity(), largest_k3 = largest_k2;
    T lanes2[L], lanes3[L];
    max_k2.store(lanes2);
    max_k3.store(lanes3);
    for (int64_t j = 0; j < L; ++j) {
      largest_k2 = (lanes2[j] > largest_k2 || std::isnan(lanes2[j])) ? lanes2[j] : largest_k2;
      largest_k3 = (lanes3[j] > largest_k3 || std::isnan(lanes3[j])) ? lanes3[j] : largest_k3;
    }
    if (count == 0) largest_k2 = largest_k3 = 0;
    const double n = std::max(count, 1.0);
    seq_ok = passes(k1, k2, k3, o, RS_SUM) && passes(k1 / n, k2 / n, k3 / n, o, RS_MEAN) &&
             passes(0.0, largest_k2, largest_k3, o, RS_MAX);
    seq_weight = std::exp(static_cast<T>(clamp(log_ratio, -20.0, 20.0)));
  }

  const bool token_options = (o.rs_flags & 7) != 0;
  const V lo(static_cast<T>(o.is_lo)), hi(static_cast<T>(o.is_hi)), truncated = o.is_window ? zero : hi;
  double sums[NUM_PARTIALS] = {};
  V tokens_acc(0), weight_acc(0), clipped_acc(0), rejected_acc(0), weight_min(inf), weight_max(-inf);
  int64_t steps = 0;
  auto flush = [&] {
    add_lanes(sums[TOKENS], tokens_acc), add_lanes(sums[WEIGHT_SUM], weight_acc);
    add_lanes(sums[CLIPPED], clipped_acc), add_lanes(sums[REJECTED], rejected_acc);
  };
  for_steps([&](const scalar_t* old_p, const scalar_t* rollout_p, const bool* mask_p, float* weights_p,
                bool* kept_p) {
    V m[2], d[2];
    load(old_p, rollout_p, mask_p, m, d);
    T out[STEP], flags[STEP];
    for (int h = 0; h < 2; ++h) {
      const V safe = clamped(d[h]), e = safe.exp();
      const V w = o.is_level == IS_TOKEN ? e : V(o.is_level == IS_SEQUENCE ? seq_weight : T(1));
      V clipped = zero, corrected = w;
      if (o.is_level != IS_NONE) {
        // Selected, not min/max: a NaN weight stays NaN.
        clipped = o.is_window ? ((w < lo) | (w > hi)) : (w > hi);
        corrected = V::blendv(w, truncated, clipped);
      }
      V ok = seq_ok ? (zero == zero) : (zero != zero);
      if (seq_ok && token_options) ok = passes_token(safe, V(T(0.5)) * safe * safe, e - one - safe, o);
      const V final_ = ok & m[h];
      V::blendv(zero, corrected, final_).store(out + h * L);
      V::blendv(zero, one, final_).store(flags + h * L);
      tokens_acc += V::blendv(zero, one, m[h]);
      weight_acc += V::blendv(zero, w, m[h]);
      weight_min = at::vec::minimum(weight_min, V::blendv(inf, w, m[h]));
      weight_max = at::vec::maximum(weight_max, V::blendv(-inf, w, m[h]));
      clipped_acc += V::blendv(zero, one, clipped & m[h]);
      rejected_acc += V::blendv(one, zero, ok) & m[h];
    }
    for (int64_t j = 0; j < STEP; ++j) {
      weights_p[j] = static_cast<float>(out[j]);
      kept_p[j] = flags[j] != T(0);
    }
    if (++steps % FLUSH == 0) flush();
  });
  flush();
  T lanes_min[L], lanes_max[L];
  weight_min.store(lanes_min);
  weight_max.store(lanes_max);
  sums[WEIGHT_MIN] = std::numeric_limits<double>::infinity();
  sums[WEIGHT_MAX] = -sums[WEIGHT_MIN];
  for (int64_t j = 0; j < L; ++j) {
    sums[WEIGHT_MIN] = (lanes_min[j] < sums[WEIGHT_MIN] || std::isnan(lanes_min[j])) ? lanes_min[j] : sums[WEIGHT_MIN];
    sums[WEIGHT_MAX] = (lanes_max[j] > sums[WEIGHT_MAX] || std::isnan(lanes_max[j])) ? lanes_max[j] : sums[WEIGHT_MAX];
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
  DISPATCH_LOGITS(dtype, "rollout_correction", [&] {
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
