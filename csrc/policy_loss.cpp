// The policy-gradient loss on CPU: fastrlhf.policy_loss (semantics in fastrlhf/ops/policy_loss.py; the
// Triton kernels in fastrlhf/kernels/policy_loss.py compute the same).
//
// Every aggregation is a weighted sum over tokens whose weights are constant along a sequence, so the op
// is: policy_loss_sequences (per sequence: unmasked tokens and the sum of the clamped log-ratio, the only
// sequence-level statistics any loss needs), a few [S] torch ops in Python that turn them into per-sequence
// weights of the policy, KL and entropy terms, then policy_loss_tokens: ONE pass over any contiguous slice
// of tokens that writes each token's gradient d loss / d logp and d loss / d entropy (optional) and
// per-block partial sums of the loss terms and metrics. policy_loss_finish combines the partial sums in
// a fixed order. Blocks have a fixed size, so results do not depend on the number of threads.
#include "vec.h"  // first: it picks the vector ISA

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "sequences.h"

namespace fastrlhf {
namespace {

// Codes shared with fastrlhf/ops/policy_loss.py (LOSS_TYPES, KL_ESTIMATORS, PARTIALS, METRICS).
enum LossType : int64_t { PPO, GSPO, CISPO, SAPO, REINFORCE };
enum KlEstimator : int64_t { K1, ABS, K2, K3 };
enum Partial {
  POLICY, KL, ENTROPY, TOKENS, CLIPFRAC, CLIPFRAC_LOW, CLIPFRAC_HIGH, DUAL_CLIPFRAC, PPO_KL, APPROX_KL,
  RATIO_SUM, RATIO_MIN, RATIO_MAX, NUM_PARTIALS
};
constexpr int NUM_METRICS = NUM_PARTIALS - 1;  // the token count becomes the means' denominator

// Tokens per block of partial sums: large enough to amortise a task, small enough to balance threads.
constexpr int64_t BLOCK_TOKENS = 1 << 15;

template <typename T>
struct Options {
  T lower, upper;   // ratio clip range; lower = -inf: no lower bound
  T dual_clip;      // 0: none
  T tau_pos, tau_neg;
  int64_t kl_estimator;
  bool kl_straight;  // "+": the value of the estimator, the gradient of k2
  T kl_coef, entropy_coef;
};

// The token pass works on vectors of Vec<T>::size() consecutive tokens of one sequence. Comparisons give
// lane masks (all bits set where true); `v & one` turns a mask into 1 or 0, `blendv` selects. Selecting
// (never multiplying by a 0/1 mask) keeps NaN at masked tokens out of every result.

// Lanes [0, count) from p as T, zeros beyond.
template <typename T, typename scalar_t>
inline Vec<T> load(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return Vec<T>::loadu(p, count);
  } else {
    __at_align__ T lanes[Vec<T>::size()] = {};
    for (int64_t k = 0; k < count; ++k) lanes[k] = static_cast<T>(p[k]);
    return Vec<T>::loadu(lanes);
  }
}

template <typename T, typename scalar_t>
inline void store(scalar_t* p, const Vec<T>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    v.store(p, count);
  } else {
    __at_align__ T lanes[Vec<T>::size()];
    v.store(lanes);
    for (int64_t k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(lanes[k]);
  }
}

// The lane mask of the tokens to use: lanes [0, count) where mask (if any) is set.
template <typename T>
inline Vec<T> load_keep(const bool* mask, int64_t count) {
  __at_align__ T lanes[Vec<T>::size()] = {};
  for (int64_t k = 0; k < count; ++k) lanes[k] = !mask || mask[k] ? T(1) : T(0);
  return Vec<T>::loadu(lanes) != Vec<T>(0);
}

// 1 where lo <= x <= hi, else 0 (also for NaN): the gradient of torch.clamp.
template <typename T>
inline Vec<T> inside(const Vec<T>& x, T lo, T hi) {
  return (x >= Vec<T>(lo)) & (x <= Vec<T>(hi)) & Vec<T>(1);
}

template <typename T>
inline Vec<T> clamp_to(const Vec<T>& x, T lo, T hi) {
  return at::vec::clamp(x, Vec<T>(lo), Vec<T>(hi));
}

template <typename T>
struct PolicyTerms {
  Vec<T> loss, slope, ratio;           // the tokens' policy loss, d loss / d logp, the ratio it clips
  Vec<T> clipped, low, high, dual;     // lane masks
};

// The policy loss of a vector of tokens (before the rollout IS weight and the aggregation weight).
template <int64_t LOSS, typename T>
inline PolicyTerms<T> policy_terms(const Vec<T>& lp, const Vec<T>& old, const Vec<T>& adv, T seq_log_ratio,
                                   const Options<T>& o) {
  const Vec<T> zero(0), one(1), neg_adv = adv.neg();
  const Vec<T> d = lp - old;
  Vec<T> log_ratio = clamp_to(d, T(-20), T(20)), dlog = inside(d, T(-20), T(20));
  if (LOSS == GSPO) {  // log s_t = sg(log s) + logp - sg(logp), clamped above at 10
    log_ratio = Vec<T>(std::min(seq_log_ratio, T(10)));
    dlog = Vec<T>(seq_log_ratio <= T(10) ? T(1) : T(0));
  }
  const Vec<T> r = log_ratio.exp(), dr = r * dlog;
  PolicyTerms<T> t{zero, zero, r, zero, zero, zero, zero};
  if (LOSS == REINFORCE) {
    t.loss = neg_adv * lp;
    t.slope = neg_adv;
    return t;
  }
  if (LOSS == SAPO) {
    const Vec<T> tau = Vec<T>::blendv(Vec<T>(o.tau_neg), Vec<T>(o.tau_pos), adv > zero);
    const Vec<T> gate = one / (one + (tau.neg() * (r - one)).exp());
    t.loss = neg_adv * gate * (Vec<T>(4) / tau);
    t.slope = neg_adv * Vec<T>(4) * gate * (one - gate) * dr;
    return t;
  }
  const Vec<T> rc = clamp_to(r, o.lower, o.upper);
  const Vec<T> below = r < Vec<T>(o.lower), above = r > Vec<T>(o.upper);
  t.low = below & (adv < zero);
  t.high = above & (adv > zero);
  if (LOSS == CISPO) {
    t.loss = rc.neg() * adv * lp;
    t.slope = rc.neg() * adv;
    t.clipped = below | above;
    return t;
  }
  const Vec<T> p1 = neg_adv * r, p2 = neg_adv * rc;
  t.clipped = p2 > p1;
  t.loss = Vec<T>::blendv(p1, p2, t.clipped);
  t.slope = Vec<T>::blendv(neg_adv * dr, neg_adv * dr * inside(r, o.lower, o.upper), t.clipped);
  if (LOSS == PPO && o.dual_clip > T(0)) {
    const Vec<T> p3 = neg_adv * Vec<T>(o.dual_clip);
    t.dual = (adv < zero) & (t.loss > p3);
    t.loss = Vec<T>::blendv(t.loss, p3, t.dual);
    t.slope = Vec<T>::blendv(t.slope, zero, t.dual);
  }
  return t;
}

// The KL estimator of logp against ref_logp (verl's kl_penalty) and the gradient it back-propagates.
template <typename T>
inline void kl_terms(const Vec<T>& lp, const Vec<T>& ref, const Options<T>& o, Vec<T>& value, Vec<T>& slope) {
  const Vec<T> x = lp - ref, zero(0), one(1);
  switch (o.kl_estimator) {
    case K1:
      value = x, slope = one;
      break;
    case ABS:
      value = x.abs(), slope = ((x > zero) & one) - ((x < zero) & one);
      break;
    case K2:
      value = x * x * Vec<T>(0.5), slope = x;
      break;
    default: {  // K3
      const Vec<T> k = clamp_to(x.neg(), T(-20), T(20)), e = k.exp(), raw = e - k - one;
      value = clamp_to(raw, T(-10), T(10));
      slope = (one - e) * inside(x.neg(), T(-20), T(20)) * inside(raw, T(-10), T(10));
    }
  }
  if (o.kl_straight) slope = x;
}

struct Tokens {
  const void* logp;
  const void* old_logp;
  const void* advantages;
  const bool* mask;
  const void* ref_logp;
  const void* entropy;
  const void* is_weights;
  void* grad_logp;
  void* grad_entropy;
};

// Tokens [0, n) of the slice are global tokens [first, first + n) of sequences cut by offsets [S + 1].
// Each block of BLOCK_TOKENS tokens sums into its own lanes, then its row of partials in lane order: the
// results depend on neither the number of threads nor the vector width's scheduling.
template <int64_t LOSS, typename scalar_t>
void token_pass(const Tokens& p, int64_t n, int64_t first, const int64_t* offsets, int64_t rows, bool adv_per_seq,
                const at::opmath_type<scalar_t>* seq_weights, const at::opmath_type<scalar_t>* seq_log_ratio,
                at::opmath_type<scalar_t> grad_scale, const Options<at::opmath_type<scalar_t>>& o,
                at::opmath_type<scalar_t>* partials) {
  using T = at::opmath_type<scalar_t>;
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const auto* lp = static_cast<const scalar_t*>(p.logp);
  const auto* old = static_cast<const scalar_t*>(p.old_logp);
  const auto* adv = static_cast<const scalar_t*>(p.advantages);
  const auto* ref = static_cast<const scalar_t*>(p.ref_logp);
  const auto* ent = static_cast<const scalar_t*>(p.entropy);
  const auto* isw = static_cast<const scalar_t*>(p.is_weights);
  auto* grad_lp = static_cast<scalar_t*>(p.grad_logp);
  auto* grad_ent = static_cast<scalar_t*>(p.grad_entropy);
  const bool* mask = p.mask;
  const int64_t blocks = (n + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
  const T inf = std::numeric_limits<T>::infinity();
  at::parallel_for(0, blocks, 1, [&](int64_t block_first, int64_t block_last) {
    const V zero(0), one(1), scale(grad_scale);
    for (int64_t block = block_first; block < block_last; ++block) {
      const int64_t begin = block * BLOCK_TOKENS, end = std::min(n, begin + BLOCK_TOKENS);
      V sums[NUM_PARTIALS];
      for (auto& v : sums) v = zero;
      sums[RATIO_MIN] = V(inf);
      sums[RATIO_MAX] = V(-inf);
      // The sequence of the block's first token, then each sequence's run of tokens in turn.
      int64_t s = std::upper_bound(offsets, offsets + rows + 1, first + begin) - offsets - 1;
      for (int64_t i = begin; i < end; ++s) {
        const int64_t run_end = std::min(end, offsets[s + 1] - first);
        const V wp(seq_weights[s]), wk(seq_weights[rows + s]), we(seq_weights[2 * rows + s]);
        const T lrs = seq_log_ratio ? seq_log_ratio[s] : T(0);
        const V seq_adv(adv_per_seq ? static_cast<T>(adv[s]) : T(0));
        const V grad_ent_value(-grad_scale * o.entropy_coef * seq_weights[2 * rows + s]);
        for (int64_t c; i < run_end; i += c) {
          c = std::min(L, run_end - i);
          const V keep = load_keep<T>(mask ? mask + i : nullptr, c);
          const auto kept = [&](const V& v) { return V::blendv(zero, v, keep); };
          if (grad_ent) store<T>(grad_ent + i, kept(grad_ent_value), c);
          const V x = load<T>(lp + i, c), x_old = load<T>(old + i, c);
          const V a = adv_per_seq ? seq_adv : load<T>(adv + i, c);
          const PolicyTerms<T> t = policy_terms<LOSS, T>(x, x_old, a, lrs, o);
          const V w = isw ? load<T>(isw + i, c) : one;
          V grad = wp * w * t.slope;
          sums[POLICY] += kept(wp * w * t.loss);
          if (ref) {
            V value, slope;
            kl_terms<T>(x, load<T>(ref + i, c), o, value, slope);
            sums[KL] += kept(wk * value);
            grad = at::vec::fmadd(V(o.kl_coef) * wk, slope, grad);
          }
          if (ent) sums[ENTROPY] += kept(we * load<T>(ent + i, c));
          if (grad_lp) store<T>(grad_lp + i, kept(scale * grad), c);
          const V log_ratio = clamp_to(x - x_old, T(-20), T(20));
          const V approx = clamp_to(log_ratio.neg().exp() + log_ratio - one, T(-10), T(10));
          sums[TOKENS] += keep & one;
          sums[CLIPFRAC] += keep & t.clipped & one;
          sums[CLIPFRAC_LOW] += keep & t.low & one;
          sums[CLIPFRAC_HIGH] += keep & t.high & one;
          sums[DUAL_CLIPFRAC] += keep & t.dual & one;
          sums[PPO_KL] -= kept(log_ratio);
          sums[APPROX_KL] += kept(approx);
          sums[RATIO_SUM] += kept(t.ratio);
          // Selected where smaller (larger): a NaN ratio is skipped, as the metrics promise.
          sums[RATIO_MIN] = V::blendv(sums[RATIO_MIN], t.ratio, keep & (t.ratio < sums[RATIO_MIN]));
          sums[RATIO_MAX] = V::blendv(sums[RATIO_MAX], t.ratio, keep & (t.ratio > sums[RATIO_MAX]));
        }
      }
      T* out = partials + block * NUM_PARTIALS;
      for (int j = 0; j < NUM_PARTIALS; ++j) {
        __at_align__ T lanes[L];
        sums[j].store(lanes);
        T total = j == RATIO_MIN ? inf : j == RATIO_MAX ? -inf : T(0);
        for (int64_t k = 0; k < L; ++k) {
          if (j == RATIO_MIN) total = lanes[k] < total ? lanes[k] : total;
          else if (j == RATIO_MAX) total = lanes[k] > total ? lanes[k] : total;
          else total += lanes[k];
        }
        out[j] = total;
      }
    }
  });
}

void policy_loss_tokens(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                        const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& ref_logp,
                        const c10::optional<at::Tensor>& entropy, const c10::optional<at::Tensor>& is_weights,
                        const at::Tensor& offsets, int64_t row_length, int64_t first, bool advantages_per_sequence,
                        const at::Tensor& seq_weights, const c10::optional<at::Tensor>& seq_log_ratio,
                        const c10::optional<at::Tensor>& grad_scale,
                        int64_t loss_type, double lower, double upper, double dual_clip, double tau_pos,
                        double tau_neg, int64_t kl_estimator, bool kl_straight, double kl_coef, double entropy_coef,
                        const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                        at::Tensor& partials) {
  check_cpu_contiguous(logp, "logp");
  const int64_t n = logp.numel();
  const int64_t* o = checked_offsets(offsets, first, n);
  const int64_t rows = offsets.numel() - 1;
  // Padded input (row_length T > 0): the Triton kernel finds a token's sequence by division, so the offsets
  // must be s * T; this kernel searches the offsets either way.
  for (int64_t s = 0; row_length > 0 && s <= rows; ++s) {
    TORCH_CHECK(o[s] == s * row_length, "offsets: expected s * row_length for padded input");
  }
  const at::ScalarType dtype = logp.scalar_type();
  TORCH_CHECK(loss_type >= PPO && loss_type <= REINFORCE, "loss_type: unknown code ", loss_type);
  TORCH_CHECK(kl_estimator >= K1 && kl_estimator <= K3, "kl_estimator: unknown code ", kl_estimator);
  const int64_t adv_n = advantages_per_sequence ? rows : n;
  TORCH_CHECK(advantages.numel() == adv_n, "advantages: expected ", adv_n, " elements, got ", advantages.numel());
  TORCH_CHECK(!grad_entropy || entropy, "grad_entropy: given without entropy");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "policy_loss_tokens", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
    check_cpu_contiguous(advantages, "advantages");
    check_dtype(advantages, dtype, "advantages");
    Tokens p{logp.data_ptr(), data_or_null(old_logp, n, dtype, "old_logp"), advantages.data_ptr(), nullptr,
             data_or_null(ref_logp, n, dtype, "ref_logp"), data_or_null(entropy, n, dtype, "entropy"),
             data_or_null(is_weights, n, dtype, "is_weights"), nullptr, nullptr};
    if (mask) p.mask = static_cast<const bool*>(data_or_null(mask, n, at::kBool, "mask"));
    p.grad_logp = const_cast<void*>(data_or_null(grad_logp, n, dtype, "grad_logp"));
    p.grad_entropy = const_cast<void*>(data_or_null(grad_entropy, n, dtype, "grad_entropy"));
    const T* w = static_cast<const T*>(data_or_null(seq_weights, 3 * rows, acc, "seq_weights"));
    const T* lrs = static_cast<const T*>(data_or_null(seq_log_ratio, rows, acc, "seq_log_ratio"));
    TORCH_CHECK(loss_type != GSPO || lrs, "seq_log_ratio: required for gspo");
    const T* g = static_cast<const T*>(data_or_null(grad_scale, 1, acc, "grad_scale"));
    const int64_t blocks = (n + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    check_cpu_contiguous(partials, "partials");
    check_dtype(partials, acc, "partials");
    TORCH_CHECK(partials.numel() == blocks * NUM_PARTIALS, "partials: expected ", blocks, " x ", NUM_PARTIALS,
                " elements, got ", partials.numel());
    const Options<T> opt{static_cast<T>(lower), static_cast<T>(upper), static_cast<T>(dual_clip),
                         static_cast<T>(tau_pos), static_cast<T>(tau_neg), kl_estimator, kl_straight,
                         static_cast<T>(kl_coef), static_cast<T>(entropy_coef)};
    const bool per_seq = advantages_per_sequence;
    const T scale = g ? g[0] : T(1);
    T* out = partials.data_ptr<T>();
    switch (loss_type) {
      case PPO: token_pass<PPO, scalar_t>(p, n, first, o, rows, per_seq, w, lrs, scale, opt, out); break;
      case GSPO: token_pass<GSPO, scalar_t>(p, n, first, o, rows, per_seq, w, lrs, scale, opt, out); break;
      case CISPO: token_pass<CISPO, scalar_t>(p, n, first, o, rows, per_seq, w, lrs, scale, opt, out); break;
      case SAPO: token_pass<SAPO, scalar_t>(p, n, first, o, rows, per_seq, w, lrs, scale, opt, out); break;
      default: token_pass<REINFORCE, scalar_t>(p, n, first, o, rows, per_seq, w, lrs, scale, opt, out);
    }
  });
}

// Per sequence: the number of unmasked tokens and (with log-probs) the mean of the clamped log-ratio.
template <typename scalar_t, typename acc_t>
void sequence_pass(const scalar_t* lp, const scalar_t* old, const bool* keep, const int64_t* o, int64_t rows,
                   int64_t n, acc_t* counts, acc_t* seq_log_ratio) {
  at::parallel_for(0, rows, std::max<int64_t>(1, rows * BLOCK_TOKENS / std::max<int64_t>(n, 1)),
                   [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      acc_t count = 0, sum = 0;
      for (int64_t i = o[s]; i < o[s + 1]; ++i) {
        const bool k = !keep || keep[i];
        count += k;
        // Selected, not multiplied: NaN at a masked token stays out.
        if (lp) sum += k ? clamp(static_cast<acc_t>(lp[i]) - static_cast<acc_t>(old[i]), acc_t(-20), acc_t(20)) : acc_t(0);
      }
      counts[s] = count;
      if (seq_log_ratio) seq_log_ratio[s] = sum / std::max(count, acc_t(1));
    }
  });
}

void policy_loss_sequences(const c10::optional<at::Tensor>& logp, const c10::optional<at::Tensor>& old_logp,
                           const c10::optional<at::Tensor>& mask, const at::Tensor& offsets, int64_t n,
                           at::Tensor& counts, const c10::optional<at::Tensor>& seq_log_ratio) {
  const int64_t* o = checked_offsets(offsets, 0, n);
  const int64_t rows = offsets.numel() - 1;
  TORCH_CHECK(o[rows] == n, "offsets: expected to end at ", n, ", got ", o[rows]);
  check_cpu_contiguous(counts, "counts");
  TORCH_CHECK(counts.numel() == rows, "counts: expected ", rows, " elements");
  TORCH_CHECK(!seq_log_ratio || (logp && old_logp), "seq_log_ratio: needs logp and old_logp");
  const bool* keep = mask ? static_cast<const bool*>(data_or_null(mask, n, at::kBool, "mask")) : nullptr;
  if (!seq_log_ratio) {
    AT_DISPATCH_FLOATING_TYPES(counts.scalar_type(), "policy_loss_sequences", [&] {
      sequence_pass<float, scalar_t>(nullptr, nullptr, keep, o, rows, n, counts.data_ptr<scalar_t>(), nullptr);
    });
    return;
  }
  check_like(*seq_log_ratio, counts, "seq_log_ratio");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp->scalar_type(), "policy_loss_sequences", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    check_dtype(counts, acc, "counts");
    check_dtype(*seq_log_ratio, acc, "seq_log_ratio");
    const void* lp = data_or_null(logp, n, logp->scalar_type(), "logp");
    const void* old = data_or_null(old_logp, n, logp->scalar_type(), "old_logp");
    sequence_pass<scalar_t, acc_t>(static_cast<const scalar_t*>(lp), static_cast<const scalar_t*>(old), keep, o,
                                   rows, n, counts.data_ptr<acc_t>(), seq_log_ratio->data_ptr<acc_t>());
  });
}

// Combines per-block partial sums [K, NUM_PARTIALS] in a fixed order (float64): the loss and the metrics.
void policy_loss_finish(const at::Tensor& partials, double kl_coef, double entropy_coef, at::Tensor& loss,
                        at::Tensor& metrics) {
  check_cpu_contiguous(partials, "partials");
  TORCH_CHECK(partials.dim() == 2 && partials.size(1) == NUM_PARTIALS, "partials: expected shape [K, ",
              NUM_PARTIALS, "], got ", partials.sizes());
  check_cpu_contiguous(loss, "loss");
  check_dtype(loss, partials.scalar_type(), "loss");
  TORCH_CHECK(loss.numel() == 1, "loss: expected one element");
  check_cpu_contiguous(metrics, "metrics");
  check_dtype(metrics, at::kFloat, "metrics");
  TORCH_CHECK(metrics.numel() == NUM_METRICS, "metrics: expected ", NUM_METRICS, " elements");
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "policy_loss_finish", [&] {
    const scalar_t* p = partials.data_ptr<scalar_t>();
    double s[NUM_PARTIALS] = {};
    s[RATIO_MIN] = std::numeric_limits<double>::infinity();
    s[RATIO_MAX] = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < partials.size(0); ++k, p += NUM_PARTIALS) {
      for (int j = 0; j < RATIO_MIN; ++j) s[j] += p[j];
      s[RATIO_MIN] = p[RATIO_MIN] < s[RATIO_MIN] ? p[RATIO_MIN] : s[RATIO_MIN];
      s[RATIO_MAX] = p[RATIO_MAX] > s[RATIO_MAX] ? p[RATIO_MAX] : s[RATIO_MAX];
    }
    loss.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(s[POLICY] + kl_coef * s[KL] - entropy_coef * s[ENTROPY]);
    float* m = metrics.data_ptr<float>();
    const double tokens = s[TOKENS];
    const double norm = tokens > 0 ? 1.0 / tokens : 0.0;
    m[0] = s[POLICY], m[1] = s[KL], m[2] = s[ENTROPY];
    for (int j = CLIPFRAC; j < RATIO_MIN; ++j) m[j - 1] = static_cast<float>(s[j] * norm);
    m[RATIO_MIN - 1] = tokens > 0 ? s[RATIO_MIN] : 0.0;
    m[RATIO_MAX - 1] = tokens > 0 ? s[RATIO_MAX] : 0.0;
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def(
      "policy_loss_tokens(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? mask, Tensor? ref_logp, "
      "Tensor? entropy, Tensor? is_weights, Tensor offsets, int row_length, int first, bool advantages_per_sequence, Tensor seq_weights, Tensor? seq_log_ratio, "
      "Tensor? grad_scale, int loss_type, float lower, float upper, float dual_clip, float tau_pos, float tau_neg, "
      "int kl_estimator, bool kl_straight, float kl_coef, float entropy_coef, Tensor(a!)? grad_logp, "
      "Tensor(b!)? grad_entropy, Tensor(c!) partials) -> ()");
  m.def(
      "policy_loss_sequences(Tensor? logp, Tensor? old_logp, Tensor? mask, Tensor offsets, int n, "
      "Tensor(a!) counts, Tensor(b!)? seq_log_ratio) -> ()");
  m.def("policy_loss_finish(Tensor partials, float kl_coef, float entropy_coef, Tensor(a!) loss, Tensor(b!) metrics) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) {
  m.impl("policy_loss_tokens", &policy_loss_tokens);
  m.impl("policy_loss_sequences", &policy_loss_sequences);
  m.impl("policy_loss_finish", &policy_loss_finish);
}

}  // namespace fastrlhf
