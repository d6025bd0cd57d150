// What the kernels over rows of logits share (logprobs.cpp, sampling_threshold.cpp): the accumulation type
// and the dtype dispatch.
// Include this header first (it includes vec.h, which picks the vector ISA).
#pragma once
#include "vec.h"

#include <type_traits>

#include "checks.h"

namespace fastrlhf {

// The accumulation type: fp64 for fp64 logits, else fp32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace fastrlhf

#define DISPATCH_LOGITS(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                         AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)         \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
