"""``fastrlhf verify``: its table, its exit code, and that a wrong kernel fails it."""

import torch

from fastrlhf.bench import verify
from fastrlhf.bench.case import error_and_bound


def test_gae_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("gae",))
    assert ok and table.row_count >= 36


def test_logprobs_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("logprobs",))
    assert ok and table.row_count >= 4 * 3 * 3  # shapes x dtypes x (logp, entropy, gradient) per backend


def test_error_beyond_twice_torch_error_fails():
    exact = torch.linspace(-3, 3, 100, dtype=torch.float64)
    torch_f32 = exact.float()
    err, bound = error_and_bound(torch_f32 + 1e-3, exact, torch_f32)
    assert err > bound
    err, bound = error_and_bound(torch_f32, exact, torch_f32)
    assert err <= bound


def test_linear_logprobs_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("linear_logprobs",))
    assert ok and table.row_count >= 45
