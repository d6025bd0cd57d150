// Log-probs of labels and entropies of rows of logits on CPU (fastrlhf.logprobs; semantics in
// fastrlhf/ops/logprobs.py), and their gradient.
//
// Rows run in parallel; each row is read once, in tiles that stay in L1: a tile's max first, then its
// exponentials against the running max (online softmax), so any vocabulary size works in one pass over
// memory. With z = x / T and m the running max, per row:
//   s = sum exp(z - m),  u = sum exp(z - m) (z - m),  lse = m + log s,  H = log s - u / s.
// A raised max m' rescales both: s' = s e^(m - m'), u' = e^(m - m') (u + (m - m') s).
//
// The vocabulary may be a shard [vocab_start, vocab_start + V) of a larger one (vocab-parallel); a
// label outside the shard contributes log-prob 0 here and is combined across ranks in Python.
//
// at::vec::Vectorized is compiled for AVX2 here (the ATen kernels' own CPU_CAPABILITY scheme, in its
// own inline namespace, so no other translation unit sees a different Vectorized) when the build
// targets AVX2 + FMA; elsewhere it falls back to ATen's portable implementation.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"

namespace fastrlhf {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();       // floats per vector
constexpr int64_t STEP = 2 * W;          // elements per loop step: one 16-bit vector, two float vectors
constexpr int64_t TILE = 128 * STEP;     // elements per tile: 8 KiB of fp32, well inside L1
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Two float vectors from STEP consecutive elements.
template <typename scalar_t>
inline std::pair<Vec, Vec> load_floats(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {Vec::loadu(p), Vec::loadu(p + W)};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    return {lo, hi};
  }
}

template <typename scalar_t>
inline void store_floats(scalar_t* p, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo.store(p);
    hi.store(p + W);
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  }
}

// exp(d) for d <= 0, and d clamped to a finite floor so that exp(d) * d is 0 (not NaN) at d = -inf.
inline Vec finite(const Vec& d) { return at::vec::maximum(d, Vec(-FLT_MAX)); }
inline float finite(float d) { return std::max(d, -FLT_MAX); }

struct RowStats {
  float lse;
  float entropy;
};

template <typename scalar_t>
RowStats row_stats(const scalar_t* x, int64_t V, float inv_t) {
  float m = NEG_INF;
  Vec s0(0.f), s1(0.f), u0(0.f), u1(0.f);
  float s_tail = 0.f, u_tail = 0.f;
  // Moves the accumulators onto a new max; called only when the max rises.
  auto raise = [&](float m_new) {
    if (m != NEG_INF) {
      const float f = std::exp(m - m_new), shift = m - m_new;
      u0 = Vec(f) * (u0 + Vec(shift) * s0);
      u1 = Vec(f) * (u1 + Vec(shift) * s1);
      s0 = s0 * Vec(f);
      s1 = s1 * Vec(f);
      u_tail = f * (u_tail + shift * s_tail);
      s_tail *= f;
    }
    m = m_new;
  };
  const int64_t body = V - V % STEP;
  for (int64_t start = 0; start < body; start += TILE) {
    const int64_t end = std::min(start + TILE, body);
    Vec mx(NEG_INF);
    for (int64_t j = start; j < end; j += STEP) {
      auto [a, b] = load_floats(x + j);
      mx = at::vec::maximum(mx, at::vec::maximum(a, b));
    }
    const float tile_max = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mx) * inv_t;
    if (tile_max > m) raise(tile_max);
    if (m == NEG_INF) continue;  // everything so far is -inf: nothing to add
    const Vec scale(inv_t), shift(m);
    for (int64_t j = start; j < end; j += STEP) {
      auto [a, b] = load_floats(x + j);
      const Vec da = finite(a * scale - shift), db = finite(b * scale - shift);
      const Vec ea = da.exp_u20(), eb = db.exp_u20();
      s0 += ea;
      s1 += eb;
      u0 = at::vec::fmadd(ea, da, u0);
      u1 = at::vec::fmadd(eb, db, u1);
    }
  }
  if (body < V) {
    float tail_max = NEG_INF;
    for (int64_t j = body; j < V; ++j) tail_max = std::max(tail_max, static_cast<float>(x[j]) * inv_t);
    if (tail_max > m) raise(tail_max);
    if (m != NEG_INF) {
      for (int64_t j = body; j < V; ++j) {
        const float d = finite(static_cast<float>(x[j]) * inv_t - m), e = std::exp(d);
        s_tail += e;
        u_tail += e * d;
      }
    }
  }
  if (m == NEG_INF) return {NEG_INF, 0.f};  // every logit is -inf: no distribution, log-probs -inf
  const auto sum = [](Vec& a, Vec& b) { return a + b; };
  const float s = at::vec::vec_reduce_all<float>(sum, s0 + s1) + s_tail;
  const float u = at::vec::vec_reduce_all<float>(sum, u0 + u1) + u_tail;
  const float log_s = std::log(s);
  return {m + log_s, log_s - u / s};
}

struct Rows {
  int64_t n, V, stride, vocab_start, ignore_index;
  const int64_t* labels;
  const float* inv_t;
};

Rows rows_of(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& inv_temp, int64_t ignore_index,
             int64_t vocab_start, int64_t vocab_size) {
  TORCH_CHECK(logits.device().is_cpu(), "logits: expected a CPU tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits: expected a 2-D tensor with unit stride in the vocab dim");
  const int64_t n = logits.size(0), V = logits.size(1);
  check_cpu_contiguous(labels, "labels");
  check_dtype(labels, at::kLong, "labels");
  TORCH_CHECK(labels.numel() == n, "labels: expected ", n, " elements, got ", labels.numel());
  check_cpu_contiguous(inv_temp, "inv_temp");
  check_dtype(inv_temp, at::kFloat, "inv_temp");
  TORCH_CHECK(inv_temp.numel() == n, "inv_temp: expected ", n, " elements, got ", inv_temp.numel());
  TORCH_CHECK(vocab_start >= 0 && vocab_start + V <= vocab_size, "vocab_start: the shard [", vocab_start, ", ",
              vocab_start + V, ") must lie inside [0, ", vocab_size, ")");
  const int64_t* l = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < vocab_size), "labels: expected values in [0, ",
                vocab_size, ") or ignore_index=", ignore_index, ", got ", l[i], " at row ", i);
  }
  return {n, V, logits.stride(0), vocab_start, ignore_index, l, inv_temp.data_ptr<float>()};
}

// fp32, bf16 and fp16 logits; the arithmetic is fp32 for all three.
#define DISPATCH_LOGITS(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

int64_t grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

void logprobs_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& inv_temp,
                      int64_t ignore_index, int64_t vocab_start, int64_t vocab_size, at::Tensor& logp,
                      at::Tensor& entropy, at::Tensor& lse) {
  const Rows r = rows_of(logits, labels, inv_temp, ignore_index, vocab_start, vocab_size);
  for (at::Tensor* t : {&logp, &entropy, &lse}) {
    check_cpu_contiguous(*t, "outputs");
    check_dtype(*t, at::kFloat, "outputs");
    TORCH_CHECK(t->numel() == r.n, "outputs: expected ", r.n, " elements, got ", t->numel());
  }
  float *lp = logp.data_ptr<float>(), *ent = entropy.data_ptr<float>(), *ls = lse.data_ptr<float>();
  DISPATCH_LOGITS(logits.scalar_type(), "logprobs_forward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, r.n, grain(r.V), [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const int64_t label = r.labels[i];
        if (label == r.ignore_index) {
          lp[i] = ent[i] = ls[i] = 0.f;
          continue;
        }
        const scalar_t* row = x + i * r.stride;
        const RowStats st = row_stats(row, r.V, r.inv_t[i]);
        const int64_t local = label - r.vocab_start;
        const bool owned = local >= 0 && local < r.V;
        // A label logit of -inf has log-prob -inf, also when the whole row is -inf (not -inf - -inf).
        const float z_label = owned ? static_cast<float>(row[local]) * r.inv_t[i] : 0.f;
        lp[i] = !owned ? 0.f : z_label == NEG_INF ? NEG_INF : z_label - st.lse;
        ent[i] = st.entropy;
        ls[i] = st.lse;
      }
    });
  });
}

// d z_j = g_logp (onehot_j - p_j) - g_ent p_j (log p_j + H), then times 1/T for the logits.
template <typename scalar_t, bool HAS_ENTROPY>
void backward_rows(const scalar_t* x, scalar_t* out, int64_t out_stride, const Rows& r, const float* lse, const float* entropy,
                   const float* g_logp, const float* g_ent) {
  at::parallel_for(0, r.n, grain(r.V), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const scalar_t* row = x + i * r.stride;
      scalar_t* grad = out + i * out_stride;
      const int64_t label = r.labels[i];
      if (label == r.ignore_index || lse[i] == NEG_INF) {
        std::fill(grad, grad + r.V, scalar_t(0));
        continue;
      }
      const float inv_t = r.inv_t[i], gl = g_logp[i];
      const float ge = HAS_ENTROPY ? g_ent[i] : 0.f, h = HAS_ENTROPY ? entropy[i] : 0.f;
      // grad_j = -p_j (gl + ge (d_j + H)) / T with d_j = log p_j, plus gl / T at the label.
      const float a = -inv_t * (gl + ge * h), b = -inv_t * ge;
      const Vec scale(inv_t), shift(lse[i]), va(a), vb(b);
      // Read before the loop: an in-place backward overwrites the row as it goes.
      const int64_t local = label - r.vocab_start;
      const bool owned = local >= 0 && local < r.V;
      const float z_label = owned ? static_cast<float>(row[local]) * inv_t : 0.f;
      const int64_t body = r.V - r.V % STEP;
      for (int64_t j = 0; j < body; j += STEP) {
        auto [za, zb] = load_floats(row + j);
        const Vec da = finite(za * scale - shift), db = finite(zb * scale - shift);
        const Vec pa = da.exp_u20(), pb = db.exp_u20();
        if constexpr (HAS_ENTROPY) {
          // p (a + b d) would be 0 * inf at d = -FLT_MAX (a -inf logit); p d is 0 there.
          store_floats(grad + j, at::vec::fmadd(vb, pa * da, pa * va), at::vec::fmadd(vb, pb * db, pb * va));
        } else {
          store_floats(grad + j, pa * va, pb * va);
        }
      }
      auto scalar = [&](float z) {
        const float d = finite(z - lse[i]), p = std::exp(d);
        return p * a + (HAS_ENTROPY ? b * (p * d) : 0.f);
      };
      for (int64_t j = body; j < r.V; ++j) grad[j] = static_cast<scalar_t>(scalar(static_cast<float>(row[j]) * inv_t));
      if (owned) grad[local] = static_cast<scalar_t>(scalar(z_label) + gl * inv_t);
    }
  });
}

void logprobs_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& inv_temp,
                       const at::Tensor& lse, const c10::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                       const c10::optional<at::Tensor>& grad_entropy, int64_t ignore_index, int64_t vocab_start,
                       int64_t vocab_size, at::Tensor& grad_logits) {
  const Rows r = rows_of(logits, labels, inv_temp, ignore_index, vocab_start, vocab_size);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(), "entropy and grad_entropy: give both or neither");
  auto floats = [&](const at::Tensor& t, const char* name) {
    check_cpu_contiguous(t, name);
    check_dtype(t, at::kFloat, name);
    TORCH_CHECK(t.numel() == r.n, name, ": expected ", r.n, " elements, got ", t.numel());
    return t.data_ptr<float>();
  };
  const float* ls = floats(lse, "lse");
  const float* gl = floats(grad_logp, "grad_logp");
  const float* h = entropy ? floats(*entropy, "entropy") : nullptr;
  const float* ge = grad_entropy ? floats(*grad_entropy, "grad_entropy") : nullptr;
  check_dtype(grad_logits, logits.scalar_type(), "grad_logits");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "grad_logits: expected shape ", logits.sizes(), ", got ",
              grad_logits.sizes());
  TORCH_CHECK(grad_logits.stride(1) == 1, "grad_logits: expected unit stride in the vocab dim");
  DISPATCH_LOGITS(logits.scalar_type(), "logprobs_backward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    if (h) {
      backward_rows<scalar_t, true>(x, out, grad_logits.stride(0), r, ls, h, gl, ge);
    } else {
      backward_rows<scalar_t, false>(x, out, grad_logits.stride(0), r, ls, h, gl, ge);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def(
      "logprobs_forward(Tensor logits, Tensor labels, Tensor inv_temp, int ignore_index, int vocab_start, "
      "int vocab_size, Tensor(a!) logp, Tensor(b!) entropy, Tensor(c!) lse) -> ()");
  m.def(
      "logprobs_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor? entropy, "
      "Tensor grad_logp, Tensor? grad_entropy, int ignore_index, int vocab_start, int vocab_size, "
      "Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}

}  // namespace fastrlhf
