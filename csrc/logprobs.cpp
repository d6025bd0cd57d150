// Log-probs of labels and entropies of rows of logits on CPU (fastrlhf.logprobs; semantics in
// fastrlhf/ops/logprobs.py), and their gradient.
//
// Rows run in parallel; each row is read once, in tiles that stay in L1: a tile's max first, then its
// exponentials against the running max (online softmax), so any vocabulary size works in one pass over
// memory. With z = x / T and m the running max, per row:
//   s = sum exp(z - m),  u = sum exp(z - m) (z - m),  lse = m + log s,  H = log s - u / s.
// A raised max m' rescales both: s' = s e^(m - m'), u' = e^(m - m') (u + (m - m') s). A NaN logit (or 1/T)
// makes its row's log-prob, entropy and gradient NaN, as in plain torch: a NaN tile max raises m to NaN,
// which no later max passes and which turns s and u NaN for good; other rows are untouched.
//
// The vocabulary may be a shard [vocab_start, vocab_start + V) of a larger one (vocab-parallel); a
// label outside the shard contributes log-prob 0 here and is combined across ranks in Python.
//
// An optional per-row threshold restricts each row to a kept set (the sampler's top-k / top-p / min-p):
// a logit whose z = x / T is below threshold[row] counts as -inf (outside the sums, zero gradient), and so
// does the label's. Without one the loops carry no comparison at all (a template parameter).
//
// Optionally (extras, TRL's ChunkedLogProbFunction outputs) also per row: log sum p^2, the mean of z, and
// whether the label is the first arg-max of z, from the same tiles (no threshold, no shard).
//
// fp32, bf16 and fp16 logits are computed in fp32 (outputs, 1/T and upstream gradients fp32); fp64
// logits in fp64 throughout, for float64 gradient checks.
#include "logits.h"  // first: it picks the vector ISA

#include <type_traits>
#include <cmath>
#include <cstdint>
#include <limits>


namespace fastrlhf {
namespace {

// Elements per loop step: two accumulation vectors (one 16-bit vector for bf16/fp16).
template <typename acc_t>
constexpr int64_t STEP = 2 * Vec<acc_t>::size();
// Elements per tile: 8 KiB of fp32, well inside L1.
constexpr int64_t TILE = 2048;

template <typename acc_t>
constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();

template <typename scalar_t, typename acc_t>
inline void store_acc(scalar_t* p, const Vec<acc_t>& lo, const Vec<acc_t>& hi) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    lo.store(p);
    hi.store(p + Vec<acc_t>::size());
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  }
}

inline Vec<float> exp_of(const Vec<float>& d) { return d.exp_u20(); }  // 20-ulp exp: ample for fp32 sums
inline Vec<double> exp_of(const Vec<double>& d) { return d.exp(); }

// d clamped to a finite floor so that exp(d) * d is 0 (not NaN) at d = -inf.
template <typename acc_t>
inline Vec<acc_t> finite(const Vec<acc_t>& d) {
  return at::vec::maximum(d, Vec<acc_t>(-std::numeric_limits<acc_t>::max()));
}
template <typename acc_t>
inline acc_t finite(acc_t d) { return std::max(d, -std::numeric_limits<acc_t>::max()); }

// z, or -inf where it lies below the row's threshold (outside the kept set); NaN stays NaN.
template <bool HAS_THRESHOLD, typename acc_t>
inline Vec<acc_t> kept(const Vec<acc_t>& z, const Vec<acc_t>& threshold) {
  if constexpr (HAS_THRESHOLD) return Vec<acc_t>::blendv(z, Vec<acc_t>(NEG_INF<acc_t>), z < threshold);
  return z;
}
template <bool HAS_THRESHOLD, typename acc_t>
inline acc_t kept(acc_t z, acc_t threshold) {
  return HAS_THRESHOLD && z < threshold ? NEG_INF<acc_t> : z;
}

template <typename acc_t>
struct RowStats {
  acc_t lse;
  acc_t entropy;
  // With EXTRAS (TRL's optional outputs): log sum p^2, the mean z, and whether the label is the first arg-max.
  acc_t log_sum_sq, mean_z, is_top1;
};

// A row's statistics. EXTRAS also sums exp(z - m)^2 (rescaled by f^2 as the max rises) and z, and keeps
// the max of z before the label's column (local): each tile's max already has it for tiles wholly before
// the label, so only the label's own tile is scanned again, in L1.
template <bool HAS_THRESHOLD, bool EXTRAS, typename scalar_t, typename acc_t = acc_type<scalar_t>>
RowStats<acc_t> row_stats(const scalar_t* x, int64_t V, acc_t inv_t, acc_t threshold, int64_t local = -1) {
  using V_t = Vec<acc_t>;
  const V_t thr(threshold);
  constexpr int64_t step = STEP<acc_t>;
  acc_t m = NEG_INF<acc_t>;
  V_t s0(0), s1(0), u0(0), u1(0), q0(0), q1(0), x0(0), x1(0);
  acc_t s_tail = 0, u_tail = 0, q_tail = 0, x_tail = 0, before = NEG_INF<acc_t>;
  // Moves the accumulators onto a new max; called only when the max rises.
  auto raise = [&](acc_t m_new) {
    if (m != NEG_INF<acc_t>) {
      const acc_t f = std::exp(m - m_new), shift = m - m_new;
      u0 = V_t(f) * (u0 + V_t(shift) * s0);
      u1 = V_t(f) * (u1 + V_t(shift) * s1);
      s0 = s0 * V_t(f);
      s1 = s1 * V_t(f);
      u_tail = f * (u_tail + shift * s_tail);
      s_tail *= f;
      if constexpr (EXTRAS) {
        q0 = q0 * V_t(f * f);
        q1 = q1 * V_t(f * f);
        q_tail *= f * f;
      }
    }
    m = m_new;
  };
  // The max of z over columns [begin, end) (before the label), NaN-propagating as the row max is.
  auto max_z = [&](int64_t begin, int64_t end) {
    acc_t mx = NEG_INF<acc_t>;
    for (int64_t j = begin; j < end; ++j) {
      const acc_t z = static_cast<acc_t>(x[j]) * inv_t;
      mx = z > mx || z != z ? z : mx;
    }
    return mx;
  };
  const int64_t body = V - V % step;
  for (int64_t start = 0; start < body; start += TILE) {
    const int64_t end = std::min(start + TILE, body);
    V_t mx(NEG_INF<acc_t>);
    for (int64_t j = start; j < end; j += step) {
      auto [a, b] = load_acc(x + j);
      // Without a threshold the max of x times 1/T is that of z (T > 0): one multiply per tile, not per element.
      if constexpr (HAS_THRESHOLD) {
        a = kept<true>(a * V_t(inv_t), thr);
        b = kept<true>(b * V_t(inv_t), thr);
      }
      mx = at::vec::maximum(mx, at::vec::maximum(a, b));
    }
    const acc_t tile_max = at::vec::vec_reduce_all<acc_t>([](V_t& a, V_t& b) { return at::vec::maximum(a, b); }, mx) *
                           (HAS_THRESHOLD ? acc_t(1) : inv_t);
    if constexpr (EXTRAS) {
      if (start < local) before = std::max(before, end <= local ? tile_max : max_z(start, local));
    }
    if (tile_max > m || tile_max != tile_max) raise(tile_max);  // a NaN max makes m, s and u NaN for good
    if (m == NEG_INF<acc_t>) {  // everything so far is -inf: nothing to add
      if constexpr (EXTRAS) x_tail = NEG_INF<acc_t>;
      continue;
    }
    const V_t scale(inv_t), shift(m);
    for (int64_t j = start; j < end; j += step) {
      auto [a, b] = load_acc(x + j);
      const V_t da = finite(kept<HAS_THRESHOLD>(a * scale, thr) - shift);
      const V_t db = finite(kept<HAS_THRESHOLD>(b * scale, thr) - shift);
      const V_t ea = exp_of(da), eb = exp_of(db);
      s0 += ea;
      s1 += eb;
      u0 = at::vec::fmadd(ea, da, u0);
      u1 = at::vec::fmadd(eb, db, u1);
      if constexpr (EXTRAS) {
        q0 = at::vec::fmadd(ea, ea, q0);
        q1 = at::vec::fmadd(eb, eb, q1);
        x0 += a;
        x1 += b;
      }
    }
  }
  if (body < V) {
    acc_t tail_max = NEG_INF<acc_t>;
    for (int64_t j = body; j < V; ++j) {
      const acc_t z = kept<HAS_THRESHOLD>(static_cast<acc_t>(x[j]) * inv_t, threshold);
      tail_max = z > tail_max || z != z ? z : tail_max;  // a NaN sticks (std::max would drop it)
    }
    if constexpr (EXTRAS) {
      if (body < local) before = std::max(before, max_z(body, std::min(V, local)));
    }
    if (tail_max > m || tail_max != tail_max) raise(tail_max);
    if (m != NEG_INF<acc_t>) {
      for (int64_t j = body; j < V; ++j) {
        const acc_t d = finite(kept<HAS_THRESHOLD>(static_cast<acc_t>(x[j]) * inv_t, threshold) - m);
        const acc_t e = std::exp(d);
        s_tail += e;
        u_tail += e * d;
        if constexpr (EXTRAS) {
          q_tail += e * e;
          x_tail += static_cast<acc_t>(x[j]);
        }
      }
    } else if constexpr (EXTRAS) {
      x_tail = NEG_INF<acc_t>;
    }
  }
  // Every logit -inf: no distribution (log sum p^2 -inf, mean -inf, no arg-max).
  if (m == NEG_INF<acc_t>) return {NEG_INF<acc_t>, 0, NEG_INF<acc_t>, NEG_INF<acc_t>, 0};
  const auto sum = [](V_t& a, V_t& b) { return a + b; };
  const acc_t s = at::vec::vec_reduce_all<acc_t>(sum, s0 + s1) + s_tail;
  const acc_t u = at::vec::vec_reduce_all<acc_t>(sum, u0 + u1) + u_tail;
  const acc_t log_s = std::log(s);
  RowStats<acc_t> out{m + log_s, log_s - u / s, 0, 0, 0};
  if constexpr (EXTRAS) {
    const acc_t q = at::vec::vec_reduce_all<acc_t>(sum, q0 + q1) + q_tail;
    out.log_sum_sq = std::log(q) - 2 * log_s;
    out.mean_z = (at::vec::vec_reduce_all<acc_t>(sum, x0 + x1) + x_tail) * inv_t / static_cast<acc_t>(V);
    // The first arg-max (as torch.argmax): at least the max, and above every column before it.
    const acc_t z_label = local >= 0 && local < V ? static_cast<acc_t>(x[local]) * inv_t : NEG_INF<acc_t>;
    out.is_top1 = z_label >= m && z_label > before ? acc_t(1) : acc_t(0);
  }
  return out;
}

// Where row i of [N, V] or [B, T, V] logits starts: (i / T) stride_b + (i % T) stride_t, so a slice such as
// logits[:, :-1, :] is read (and, in place, written) where it lies, never copied.
struct Layout {
  int64_t T, stride_b, stride_t;
  int64_t offset(int64_t i) const { return (i / T) * stride_b + (i % T) * stride_t; }
};

Layout layout_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, name, ": expected a 2-D [N, V] or 3-D [B, T, V] tensor, got ", t.dim(),
              "-D");
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, name, ": expected unit stride in the vocab dim, got ",
              t.stride(-1));
  if (t.dim() == 2) return {std::max<int64_t>(t.size(0), 1), 0, t.stride(0)};
  return {std::max<int64_t>(t.size(1), 1), t.stride(0), t.stride(1)};
}

struct Rows {
  int64_t n, V, vocab_start, vocab_size, ignore_index;
  Layout layout;
  const int64_t* labels;
  at::ScalarType acc;  // dtype of 1/T, the outputs and the upstream gradients

  // Row i's label, refused unless in [0, vocab_size) or ignore_index: checked in the row loop itself (an
  // exception in a worker reaches the caller), not in a second pass over the labels.
  int64_t label(int64_t i) const {
    const int64_t l = labels[i];
    TORCH_CHECK(l == ignore_index || (l >= 0 && l < vocab_size), "labels: expected values in [0, ", vocab_size,
                ") or ignore_index=", ignore_index, ", got ", l, " at row ", i);
    return l;
  }
};

Rows rows_of(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& inv_temp, int64_t ignore_index,
             int64_t vocab_start, int64_t vocab_size) {
  const Layout layout = layout_of(logits, "logits");
  const int64_t V = logits.size(-1), n = logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_cpu_contiguous(labels, "labels");
  check_dtype(labels, at::kLong, "labels");
  TORCH_CHECK(labels.numel() == n, "labels: expected ", n, " elements, got ", labels.numel());
  TORCH_CHECK(vocab_start >= 0 && vocab_start + V <= vocab_size, "vocab_start: the shard [", vocab_start, ", ",
              vocab_start + V, ") must lie inside [0, ", vocab_size, ")");
  return {n, V, vocab_start, vocab_size, ignore_index, layout, labels.data_ptr<int64_t>(), acc};
}

// A per-row vector of the accumulation type (outputs, 1/T, upstream gradients).
template <typename acc_t>
acc_t* per_row(const at::Tensor& t, const Rows& r, const char* name) {
  check_cpu_contiguous(t, name);
  check_dtype(t, r.acc, name);
  TORCH_CHECK(t.numel() == r.n, name, ": expected ", r.n, " elements, got ", t.numel());
  return t.data_ptr<acc_t>();
}

int64_t grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// Calls f with std::true_type or std::false_type: a runtime flag as a template parameter.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

void logprobs_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& inv_temp,
                      const c10::optional<at::Tensor>& threshold, int64_t ignore_index, int64_t vocab_start,
                      int64_t vocab_size, at::Tensor& logp, at::Tensor& entropy, at::Tensor& lse,
                      const c10::optional<at::Tensor>& extras) {
  const Rows r = rows_of(logits, labels, inv_temp, ignore_index, vocab_start, vocab_size);
  TORCH_CHECK(!(extras && threshold), "extras: not computed with a threshold (the kept set)");
  DISPATCH_LOGITS(logits.scalar_type(), "logprobs_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* inv_t = per_row<acc_t>(inv_temp, r, "inv_temp");
    const acc_t* thr = threshold ? per_row<acc_t>(*threshold, r, "threshold") : nullptr;
    acc_t *lp = per_row<acc_t>(logp, r, "logp"), *ent = per_row<acc_t>(entropy, r, "entropy");
    acc_t* ls = per_row<acc_t>(lse, r, "lse");
    acc_t* ex = nullptr;
    if (extras) {
      check_flat(*extras, r.acc, 3 * r.n, "extras");
      ex = extras->data_ptr<acc_t>();
    }
    const scalar_t* x = logits.data_ptr<scalar_t>();
    with_flag(thr != nullptr, [&](auto has_threshold) {
      with_flag(ex != nullptr, [&](auto has_extras) {
        constexpr bool HAS_THRESHOLD = decltype(has_threshold)::value, EXTRAS = decltype(has_extras)::value;
        if constexpr (!(HAS_THRESHOLD && EXTRAS)) {
          at::parallel_for(0, r.n, grain(r.V), [&](int64_t first, int64_t last) {
            for (int64_t i = first; i < last; ++i) {
              const int64_t label = r.label(i);
              if (label == r.ignore_index) {
                lp[i] = ent[i] = ls[i] = 0;
                if (EXTRAS) ex[i] = ex[r.n + i] = ex[2 * r.n + i] = 0;
                continue;
              }
              const scalar_t* row = x + r.layout.offset(i);
              const acc_t t = HAS_THRESHOLD ? thr[i] : acc_t(0);
              const int64_t local = label - r.vocab_start;
              const RowStats<acc_t> st = row_stats<HAS_THRESHOLD, EXTRAS>(row, r.V, inv_t[i], t, local);
              const bool owned = local >= 0 && local < r.V;
              // A label logit of -inf (or outside the kept set) has log-prob -inf, also when the whole row is
              // -inf (not -inf - -inf); a NaN anywhere in the row makes everything NaN.
              const acc_t z_label =
                  owned ? kept<HAS_THRESHOLD>(static_cast<acc_t>(row[local]) * inv_t[i], t) : acc_t(0);
              const bool minus_inf = z_label == NEG_INF<acc_t> && !std::isnan(st.lse);
              lp[i] = !owned ? acc_t(0) : minus_inf ? NEG_INF<acc_t> : z_label - st.lse;
              ent[i] = st.entropy;
              ls[i] = st.lse;
              if constexpr (EXTRAS) {
                ex[i] = st.log_sum_sq;
                ex[r.n + i] = st.mean_z;
                ex[2 * r.n + i] = st.is_top1;
              }
            }
          });
        }
      });
    });
  });
}

// d z_j = g_logp (onehot_j - p_j) - g_ent p_j (log p_j + H), then times 1/T for the logits; p_j = 0 outside
// the kept set. A label outside the kept set still gets its g_logp / T: its caller zeroes that row's upstream
// gradients (fastrlhf.ops.logprobs_local.logits_grad), which a vocab shard without the label could not see.
template <typename scalar_t, bool HAS_ENTROPY, bool HAS_THRESHOLD, typename acc_t = acc_type<scalar_t>>
void backward_rows(const scalar_t* x, scalar_t* out, const Layout& out_layout, const Rows& r, const acc_t* inv_temp,
                   const acc_t* threshold, const acc_t* lse, const acc_t* entropy, const acc_t* g_logp,
                   const acc_t* g_ent) {
  using V_t = Vec<acc_t>;
  constexpr int64_t step = STEP<acc_t>;
  at::parallel_for(0, r.n, grain(r.V), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const scalar_t* row = x + r.layout.offset(i);
      scalar_t* grad = out + out_layout.offset(i);
      const int64_t label = r.label(i);
      if (label == r.ignore_index || lse[i] == NEG_INF<acc_t>) {
        std::fill(grad, grad + r.V, scalar_t(0));
        continue;
      }
      const acc_t inv_t = inv_temp[i], gl = g_logp[i];
      const acc_t ge = HAS_ENTROPY ? g_ent[i] : acc_t(0), h = HAS_ENTROPY ? entropy[i] : acc_t(0);
      // grad_j = -p_j (gl + ge (d_j + H)) / T with d_j = log p_j, plus gl / T at the label.
      const acc_t a = -inv_t * (gl + ge * h), b = -inv_t * ge;
      const acc_t t = HAS_THRESHOLD ? threshold[i] : acc_t(0);
      const V_t scale(inv_t), shift(lse[i]), va(a), vb(b), thr(t);
      // Read before the loop: an in-place backward overwrites the row as it goes.
      const int64_t local = label - r.vocab_start;
      const bool owned = local >= 0 && local < r.V;
      const acc_t z_label = owned ? kept<HAS_THRESHOLD>(static_cast<acc_t>(row[local]) * inv_t, t) : acc_t(0);
      const int64_t body = r.V - r.V % step;
      for (int64_t j = 0; j < body; j += step) {
        auto [za, zb] = load_acc(row + j);
        const V_t da = finite(kept<HAS_THRESHOLD>(za * scale, thr) - shift);
        const V_t db = finite(kept<HAS_THRESHOLD>(zb * scale, thr) - shift);
        const V_t pa = exp_of(da), pb = exp_of(db);
        if constexpr (HAS_ENTROPY) {
          // p (a + b d) would be 0 * inf at d = -max (a -inf logit); p d is 0 there.
          store_acc(grad + j, at::vec::fmadd(vb, pa * da, pa * va), at::vec::fmadd(vb, pb * db, pb * va));
        } else {
          store_acc(grad + j, pa * va, pb * va);
        }
      }
      auto scalar = [&](acc_t z) {
        const acc_t d = finite(z - lse[i]), p = std::exp(d);
        return p * a + (HAS_ENTROPY ? b * (p * d) : acc_t(0));
      };
      for (int64_t j = body; j < r.V; ++j) {
        grad[j] = static_cast<scalar_t>(scalar(kept<HAS_THRESHOLD>(static_cast<acc_t>(row[j]) * inv_t, t)));
      }
      if (owned) grad[local] = static_cast<scalar_t>(scalar(z_label) + gl * inv_t);
    }
  });
}

void logprobs_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& inv_temp,
                       const c10::optional<at::Tensor>& threshold, const at::Tensor& lse,
                       const c10::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                       const c10::optional<at::Tensor>& grad_entropy, int64_t ignore_index, int64_t vocab_start,
                       int64_t vocab_size, at::Tensor& grad_logits) {
  const Rows r = rows_of(logits, labels, inv_temp, ignore_index, vocab_start, vocab_size);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(), "entropy and grad_entropy: give both or neither");
  const Layout out_layout = layout_of(grad_logits, "grad_logits");
  check_dtype(grad_logits, logits.scalar_type(), "grad_logits");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "grad_logits: expected shape ", logits.sizes(), ", got ",
              grad_logits.sizes());
  DISPATCH_LOGITS(logits.scalar_type(), "logprobs_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* inv_t = per_row<acc_t>(inv_temp, r, "inv_temp");
    const acc_t* thr = threshold ? per_row<acc_t>(*threshold, r, "threshold") : nullptr;
    const acc_t* ls = per_row<acc_t>(lse, r, "lse");
    const acc_t* gl = per_row<acc_t>(grad_logp, r, "grad_logp");
    const acc_t* ent = entropy ? per_row<acc_t>(*entropy, r, "entropy") : nullptr;
    const acc_t* ge = grad_entropy ? per_row<acc_t>(*grad_entropy, r, "grad_entropy") : nullptr;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    with_flag(ent != nullptr, [&](auto has_entropy) {
      with_flag(thr != nullptr, [&](auto has_threshold) {
        backward_rows<scalar_t, decltype(has_entropy)::value, decltype(has_threshold)::value>(
            x, out, out_layout, r, inv_t, thr, ls, ent, gl, ge);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def(
      "logprobs_forward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor? threshold, int ignore_index, "
      "int vocab_start, int vocab_size, Tensor(a!) logp, Tensor(b!) entropy, Tensor(c!) lse, Tensor(d!)? extras=None) -> ()");
  m.def(
      "logprobs_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor? threshold, Tensor lse, "
      "Tensor? entropy, Tensor grad_logp, Tensor? grad_entropy, int ignore_index, int vocab_start, "
      "int vocab_size, "
      "Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}

}  // namespace fastrlhf
