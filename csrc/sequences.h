// Flat token tensors cut into sequences by offsets [S + 1], the layout of policy_loss.cpp and
// rollout_correction.cpp: the checks of their optional inputs and offsets, and the clamp both apply.
#pragma once
#include <algorithm>
#include <cstdint>

#include "checks.h"

namespace fastrlhf {

template <typename T>
inline T clamp(T x, T lo, T hi) {
  return std::min(std::max(x, lo), hi);
}

// The data of an optional contiguous CPU tensor of `dtype` with `n` elements, or nullptr when absent.
inline const void* data_or_null(const c10::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype,
                                const char* name) {
  if (!t) return nullptr;
  check_cpu_contiguous(*t, name);
  check_dtype(*t, dtype, name);
  TORCH_CHECK(t->numel() == n, name, ": expected ", n, " elements, got ", t->numel());
  return t->data_ptr();
}

// int64 offsets [S + 1] (S >= 1) from 0, non-decreasing, covering tokens [first, first + n).
inline const int64_t* checked_offsets(const at::Tensor& offsets, int64_t first, int64_t n) {
  check_cpu_contiguous(offsets, "offsets");
  check_dtype(offsets, at::kLong, "offsets");
  const int64_t rows = offsets.numel() - 1;
  TORCH_CHECK(rows >= 1, "offsets: expected at least 2 elements");
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, "offsets: expected to start at 0, got ", o[0]);
  for (int64_t i = 0; i < rows; ++i) TORCH_CHECK(o[i] <= o[i + 1], "offsets: expected non-decreasing values");
  TORCH_CHECK(first >= 0 && first + n <= o[rows], "first: tokens [", first, ", ", first + n,
              ") lie outside the sequences [0, ", o[rows], ")");
  return o;
}

}  // namespace fastrlhf
