// ATen's vector types for the kernels that use them (logprobs, sampling_threshold, policy_loss).
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

namespace fastrlhf {

template <typename T>
using Vec = at::vec::Vectorized<T>;

}  // namespace fastrlhf
