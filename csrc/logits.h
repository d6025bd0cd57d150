// What the vectorised kernels share (logprobs.cpp, sampling_threshold.cpp over rows of logits,
// rollout_correction.cpp over tokens): ATen's vectorised types, the accumulation type, the loads that widen
// to it and the dtype dispatch.
//
// at::vec::Vectorized is compiled for AVX2 here (the ATen kernels' own CPU_CAPABILITY scheme, in its own
// inline namespace, so no other translation unit sees a different Vectorized) when the build targets
// AVX2 + FMA; elsewhere it falls back to ATen's portable implementation. Include this header first.
#pragma once
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <utility>

#include "checks.h"

namespace fastrlhf {

// The accumulation type: fp64 for fp64 logits, else fp32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

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
