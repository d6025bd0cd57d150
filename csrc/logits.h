// What the vectorised kernels share (logprobs.cpp, sampling_threshold.cpp over rows of logits,
// rollout_correction.cpp over tokens): the accumulation type, the loads that widen to it and the dtype
// dispatch. Include this header first (it includes vec.h, which picks the vector ISA).
#pragma once
#include "vec.h"

#include <type_traits>
#include <utility>

#include "checks.h"

namespace fastrlhf {

// The accumulation type: fp64 for fp64 logits, else fp32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Two accumulation vectors from 2 * Vec<acc_t>::size() consecutive elements (one 16-bit vector for
// bf16/fp16).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline std::pair<Vec<acc_t>, Vec<acc_t>> load_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {Vec<acc_t>::loadu(p), Vec<acc_t>::loadu(p + Vec<acc_t>::size())};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    return {lo, hi};
  }
}

}  // namespace fastrlhf

#define DISPATCH_LOGITS(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                         AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)         \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
