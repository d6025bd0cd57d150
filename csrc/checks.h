// Checks at the C++ boundary. Python validates arguments first with friendlier messages; these keep the
// kernels from reading or writing out of bounds when they are called directly (torch.ops.fastrlhf_cpp.*)
// or under compile: every entry checks each tensor it reads or writes (device, dtype, layout, sizes and,
// where a value becomes an address, its range). Each failure raises RuntimeError naming the argument.
//
// Also the one set of torch headers every kernel file needs: tensors, the few factory functions the
// kernels call, dtype dispatch and op registration. Not <torch/extension.h>, which pulls in the whole C++
// frontend and pybind11: three times the compile time and memory per file (70 s and 1.6 GB against 23 s
// and 0.6 GB for whiten.cpp at -O3), which CI pays on every run.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace fastrlhf {

inline void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_numel(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got ", t.numel());
}

// A contiguous CPU tensor of `dtype` with `numel` elements.
inline void check_flat(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  check_cpu_contiguous(t, name);
  check_dtype(t, dtype, name);
  check_numel(t, numel, name);
}

}  // namespace fastrlhf
