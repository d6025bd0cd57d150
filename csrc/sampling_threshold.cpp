// Per-row sampler thresholds on CPU (fastrlhf.sampling_threshold; semantics in
// fastrlhf/ops/sampling_threshold.py): after min-p, top-k and top-p the kept tokens of a row are
// exactly {z >= threshold}, z = logits / T, found here by selection, never by sorting the row.
//
// Per row:
//   1. one pass for the max m (a NaN anywhere makes the threshold NaN);
//   2. min-p keeps z >= m + log(min_p) (p >= min_p * p_max), no pass needed;
//   3. one pass builds a histogram over the top 11 bits of each kept value's order-preserving integer
//      key: counts and probability masses exp(z - m) (fp64 sums) per bin;
//   4. top-k: walking the bins from the top finds the bin holding the k-th largest value; one pass
//      gathers that bin's values and a radix descent over their lower bits (11 at a time, compacting to
//      the chosen sub-bin each time) finds the exact value. Ties with it are kept.
//   5. top-p over what remains: the threshold is the largest v with mass(z >= v) >= p * mass(kept), i.e.
//      the smallest value whose strictly larger kept tokens hold less than p of the mass (tie groups are
//      kept or dropped whole). Same walk and descent, by mass; the bin is the top-k bin (already
//      gathered) or one more gathering pass.
// So a row is read 3 or 4 times (in cache for rows up to a few hundred KiB), and each descent touches
// only one bin's values. Per-thread scratch: two histograms and the gathered bins, nothing per row.
//
// fp32, bf16 and fp16 logits are decided in fp32 (z = x * inv_temp rounded to fp32, as the log-prob
// kernels compute it), fp64 logits in fp64.
#include "logits.h"  // first: it picks the vector ISA

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>


namespace fastrlhf {
namespace {


// Order-preserving unsigned keys: a < b as floats (NaN excluded, -0 == +0) iff key(a) < key(b).
template <typename acc_t>
using key_type = std::conditional_t<std::is_same_v<acc_t, double>, uint64_t, uint32_t>;
template <typename acc_t>
constexpr int KEY_BITS = 8 * sizeof(acc_t);

template <typename acc_t, typename U = key_type<acc_t>>
inline U key_of(acc_t z) {
  z += acc_t(0);  // -0 becomes +0: equal values share one key
  U bits;
  std::memcpy(&bits, &z, sizeof bits);
  constexpr U sign = U(1) << (KEY_BITS<acc_t> - 1);
  return (bits & sign) ? ~bits : (bits | sign);
}

template <typename acc_t, typename U = key_type<acc_t>>
inline acc_t value_of(U key) {
  constexpr U sign = U(1) << (KEY_BITS<acc_t> - 1);
  const U bits = (key & sign) ? (key & ~sign) : ~key;
  acc_t z;
  std::memcpy(&z, &bits, sizeof z);
  return z;
}

constexpr int DIGIT = 11;            // bits per radix level: 2048 bins of 16 bytes, in L1
constexpr int BINS = 1 << DIGIT;
constexpr int64_t TILE = 1024;       // values per tile, upcast and scaled into scratch

template <typename acc_t>
struct Candidate {
  key_type<acc_t> key;
  double mass;
};

struct Histogram {
  std::vector<int64_t> count = std::vector<int64_t>(BINS);
  std::vector<double> mass = std::vector<double>(BINS);
};

template <typename acc_t>
struct Scratch {
  Histogram top, sub;  // the row's top-digit histogram, and the descents' (which must not overwrite it)
  std::vector<acc_t> z = std::vector<acc_t>(TILE), e = std::vector<acc_t>(TILE);
  std::vector<Candidate<acc_t>> bin, work;  // one gathered bin, and the copy a descent compacts
};

template <typename acc_t>
constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();

// z = x * inv_t for x[start, start + n) into s.z (vectorised upcast, then scale).
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* x, int64_t n, acc_t inv_t, acc_t* z) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    at::vec::map([inv_t](Vec<acc_t> v) { return v * Vec<acc_t>(inv_t); }, z, x, n);
  } else {
    at::vec::convert(x, z, n);
    at::vec::map([inv_t](Vec<acc_t> v) { return v * Vec<acc_t>(inv_t); }, z, z, n);
  }
}

// Calls f(z, e) for every element of the row, tile by tile; e = exp(z - m) when WITH_MASS (1-ulp exp).
template <bool WITH_MASS, typename scalar_t, typename acc_t, typename F>
inline void for_each_value(const scalar_t* x, int64_t V, acc_t inv_t, acc_t m, Scratch<acc_t>& s, F f) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t start = 0; start < V; start += TILE) {
    const int64_t n = std::min(TILE, V - start);
    load_tile(x + start, n, inv_t, s.z.data());
    if constexpr (WITH_MASS) {
      at::vec::map([m](Vec v) { return (v - Vec(m)).exp(); }, s.e.data(), s.z.data(), n);
    }
    for (int64_t j = 0; j < n; ++j) f(s.z[j], WITH_MASS ? s.e[j] : acc_t(0));
  }
}

// The row's max of z; NaN if any z is NaN (at::vec::maximum propagates NaN).
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* x, int64_t V, acc_t inv_t, Scratch<acc_t>& s) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t m = NEG_INF<acc_t>;
  for (int64_t start = 0; start < V; start += TILE) {
    const int64_t n = std::min(TILE, V - start);
    load_tile(x + start, n, inv_t, s.z.data());
    Vec mx(NEG_INF<acc_t>);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) mx = at::vec::maximum(mx, Vec::loadu(s.z.data() + j));
    const acc_t tile_max = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mx);
    if (std::isnan(tile_max)) return tile_max;
    m = std::max(m, tile_max);
    for (; j < n; ++j) {
      if (std::isnan(s.z[j])) return s.z[j];
      m = std::max(m, s.z[j]);
    }
  }
  return m;
}

// The bin b (walking from the top) where the weight above it plus its own first reaches target, with the
// weight above it. Masses may miss the target by rounding: then the lowest non-empty bin.
template <typename W>
std::pair<int, W> walk(const W* weight, int bins, W target, W above) {
  int last = -1;
  for (int b = bins - 1; b >= 0; --b) {
    if (weight[b] == 0) continue;
    if (above + weight[b] >= target) return {b, above};
    above += weight[b];
    last = b;
  }
  return {last, above - weight[last]};
}

// The key v among the candidates (all sharing the bits above `shift_done`) with
// W(key > v) < target <= W(key >= v), W counting (BY_MASS false) or summing masses; `above` is the
// weight of the row's keys above the candidates. Radix descent: a histogram of the next DIGIT bits,
// the walk picks a sub-bin, the candidates are compacted to it; until every bit is decided.
template <bool BY_MASS, typename acc_t>
key_type<acc_t> descend(std::vector<Candidate<acc_t>>& c, int shift_done, std::conditional_t<BY_MASS, double, int64_t> target,
                        std::conditional_t<BY_MASS, double, int64_t> above, Scratch<acc_t>& s) {
  using U = key_type<acc_t>;
  size_t n = c.size();
  while (shift_done > 0) {
    const int width = std::min(DIGIT, shift_done), shift = shift_done - width, bins = 1 << width;
    const U mask = (U(1) << width) - 1;
    std::fill(s.sub.count.begin(), s.sub.count.begin() + bins, 0);
    std::fill(s.sub.mass.begin(), s.sub.mass.begin() + bins, 0.0);
    for (size_t i = 0; i < n; ++i) {
      const size_t d = (c[i].key >> shift) & mask;
      s.sub.count[d] += 1;
      s.sub.mass[d] += c[i].mass;
    }
    int bin;
    if constexpr (BY_MASS) {
      std::tie(bin, above) = walk(s.sub.mass.data(), bins, target, above);
    } else {
      std::tie(bin, above) = walk(s.sub.count.data(), bins, target, above);
    }
    size_t kept = 0;
    for (size_t i = 0; i < n; ++i) {
      if (((c[i].key >> shift) & mask) == U(bin)) c[kept++] = c[i];
    }
    n = kept;
    shift_done = shift;
  }
  return c[0].key;
}

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
acc_t row_threshold(const scalar_t* x, int64_t V, acc_t inv_t, int64_t top_k, acc_t top_p, acc_t min_p,
                    Scratch<acc_t>& s) {
  using U = key_type<acc_t>;
  constexpr acc_t NaN = std::numeric_limits<acc_t>::quiet_NaN();
  constexpr int SHIFT0 = KEY_BITS<acc_t> - DIGIT;
  const bool use_k = top_k > 0 && top_k < V, use_p = !(top_p >= 1), use_min_p = min_p > 0;
  if (!use_k && !use_p && !use_min_p) return NEG_INF<acc_t>;
  if (std::isnan(top_p) || top_p < 0 || std::isnan(min_p) || min_p > 1) return NaN;  // invalid: poison the row
  const acc_t m = row_max(x, V, inv_t, s);
  if (std::isnan(m)) return NaN;
  if (m == NEG_INF<acc_t>) return NEG_INF<acc_t>;  // every logit -inf: no distribution to filter
  const acc_t floor = use_min_p ? m + std::log(min_p) : NEG_INF<acc_t>;
  if (!use_k && !use_p) return floor;
  if (use_p && top_p <= 0) return m;  // top-p 0 keeps the most likely tokens only (ties whole)

  // Level 0: counts and masses of the values above the min-p floor, by their top DIGIT key bits.
  std::fill(s.top.count.begin(), s.top.count.end(), 0);
  std::fill(s.top.mass.begin(), s.top.mass.end(), 0.0);
  const auto histogram = [&](acc_t z, acc_t e) {
    if (z >= floor) {
      const U d = key_of(z) >> SHIFT0;
      s.top.count[d] += 1;
      s.top.mass[d] += e;
    }
  };
  if (use_p) for_each_value<true>(x, V, inv_t, m, s, histogram);
  else for_each_value<false>(x, V, inv_t, m, s, histogram);
  // The values above the floor in bin `bin` into s.bin, with their masses.
  const auto gather = [&](U bin) {
    s.bin.clear();
    for_each_value<false>(x, V, inv_t, m, s, [&](acc_t z, acc_t) {
      if (z >= floor && (key_of(z) >> SHIFT0) == bin) s.bin.push_back({key_of(z), std::exp(double(z - m))});
    });
  };

  acc_t threshold = floor;
  int64_t remaining = 0;
  for (int b = 0; b < BINS; ++b) remaining += s.top.count[b];
  int k_bin = -1;
  U k_key = 0;
  if (use_k && remaining > top_k) {
    int64_t above;
    std::tie(k_bin, above) = walk(s.top.count.data(), BINS, top_k, int64_t(0));
    gather(U(k_bin));
    s.work = s.bin;
    k_key = descend<false, acc_t>(s.work, SHIFT0, top_k, above, s);
    threshold = std::max(threshold, value_of<acc_t>(k_key));
    if (use_p) {  // top-p sees only what top-k kept: the bins above, and the top of the k-th value's bin
      std::fill(s.top.mass.begin(), s.top.mass.begin() + k_bin, 0.0);
      double part = 0;
      for (const auto& c : s.bin) part += c.key >= k_key ? c.mass : 0.0;
      s.top.mass[k_bin] = part;
    }
  }
  if (use_p) {
    double total = 0;
    for (int b = 0; b < BINS; ++b) total += s.top.mass[b];
    const double target = double(top_p) * total;
    auto [p_bin, above] = walk(s.top.mass.data(), BINS, target, 0.0);
    if (p_bin == k_bin) {
      s.work.clear();
      for (const auto& c : s.bin) if (c.key >= k_key) s.work.push_back(c);
    } else {
      gather(U(p_bin));
      s.work = s.bin;
    }
    threshold = std::max(threshold, value_of<acc_t>(descend<true, acc_t>(s.work, SHIFT0, target, above, s)));
  }
  return threshold;
}

void sampling_threshold(const at::Tensor& logits, const at::Tensor& inv_temp, const at::Tensor& top_k,
                        const at::Tensor& top_p, const at::Tensor& min_p, at::Tensor& threshold) {
  TORCH_CHECK(logits.device().is_cpu(), "logits: expected a CPU tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.stride(0) >= logits.size(1),
              "logits: expected a 2-D tensor with unit stride in the vocab dim and rows that do not overlap");
  const int64_t n = logits.size(0), V = logits.size(1);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto per_row = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
    check_cpu_contiguous(t, name);
    check_dtype(t, dtype, name);
    TORCH_CHECK(t.numel() == n, name, ": expected ", n, " elements, got ", t.numel());
  };
  per_row(inv_temp, acc, "inv_temp");
  per_row(top_k, at::kLong, "top_k");
  per_row(top_p, acc, "top_p");
  per_row(min_p, acc, "min_p");
  per_row(threshold, acc, "threshold");
  DISPATCH_LOGITS(logits.scalar_type(), "sampling_threshold", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const acc_t *inv_t = inv_temp.data_ptr<acc_t>(), *p = top_p.data_ptr<acc_t>(), *mp = min_p.data_ptr<acc_t>();
    const int64_t* k = top_k.data_ptr<int64_t>();
    acc_t* out = threshold.data_ptr<acc_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t first, int64_t last) {
      Scratch<acc_t> s;
      for (int64_t i = first; i < last; ++i) {
        out[i] = row_threshold(x + i * logits.stride(0), V, inv_t[i], k[i], p[i], mp[i], s);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrlhf_cpp, m) {
  m.def(
      "sampling_threshold(Tensor logits, Tensor inv_temp, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor(a!) threshold) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cpp, CPU, m) { m.impl("sampling_threshold", &sampling_threshold); }

}  // namespace fastrlhf
