"""fastrlhf.masked_whiten against verl's formula (fastrlhf.reference.masked_whiten)."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.ops.whiten import _torch_formula


def inputs(B, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=dtype) * 3 + 1, torch.rand(B, T, generator=g) > 0.3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(8, 50), (3, 70001)])
def test_masked_whiten_matches_verl(dtype, shape):
    x, mask = inputs(*shape, seed=21, dtype=dtype)
    for shift_mean in (True, False):
        torch.testing.assert_close(fastrlhf.masked_whiten(x, mask, shift_mean=shift_mean),
                                   reference.masked_whiten(x.double(), mask, shift_mean=shift_mean).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_float64(dtype):
    x, mask = inputs(16, 300, seed=24)
    x = x.to(dtype)
    exact = reference.masked_whiten(x.double(), mask)
    same_precision = reference.masked_whiten(x, mask).double()
    got = fastrlhf.masked_whiten(x, mask)
    assert got.dtype == dtype
    # at most twice PyTorch's own error in that precision (plus one ulp of the output's scale)
    bound = 2 * (same_precision - exact).abs().max() + torch.finfo(dtype).eps * exact.abs().max()
    assert (got.double() - exact).abs().max() <= bound


def test_masked_whiten_ignores_garbage():
    x, mask = inputs(4, 30, seed=22)
    dirty = x.masked_fill(~mask, math.nan)
    torch.testing.assert_close(fastrlhf.masked_whiten(dirty, mask)[mask], fastrlhf.masked_whiten(x, mask)[mask])


@pytest.mark.parametrize("shift_mean", [True, False])
def test_gradients(shift_mean):
    x, mask = inputs(3, 7, seed=25, dtype=torch.float64)
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x: fastrlhf.masked_whiten(x, mask, shift_mean=shift_mean), (x,))
    upstream = torch.randn_like(x)
    got = torch.autograd.grad((fastrlhf.masked_whiten(x, mask, shift_mean=shift_mean) * upstream).sum(), x)
    want = torch.autograd.grad((reference.masked_whiten(x, mask, shift_mean=shift_mean) * upstream).sum(), x)
    torch.testing.assert_close(got, want)


def test_opcheck():
    x, mask = inputs(5, 9, seed=26, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastrlhf.masked_whiten_forward, (x.requires_grad_(), mask, True, 1e-8))
    out, stats = torch.ops.fastrlhf.masked_whiten_forward(x.detach(), mask, False, 1e-8)
    torch.library.opcheck(torch.ops.fastrlhf.masked_whiten_backward, (torch.randn_like(out), x.detach(), mask, stats, False))


def test_bad_input_names_the_argument():
    x, mask = inputs(3, 4, seed=23)
    with pytest.raises(TypeError, match="x"):
        fastrlhf.masked_whiten(mask, mask)
    with pytest.raises(ValueError, match="mask"):
        fastrlhf.masked_whiten(x, mask[:1])
    with pytest.raises(ValueError, match="mask: expected at least 2"):
        fastrlhf.masked_whiten(x, torch.zeros_like(mask))


def test_cpp_ops_check_every_argument():
    """Direct calls of the C++ ops with a bad argument raise RuntimeError naming it."""
    cpp = fastrlhf.backend.cpp_ops()
    x, mask = inputs(3, 4, seed=27, dtype=torch.float64)
    out = torch.empty_like(x)
    for name, call in [
        ("x", lambda: cpp.masked_whiten_forward(x.long(), mask, True, 1e-8, out)),
        ("x", lambda: cpp.masked_whiten_forward(x.T, mask, True, 1e-8, out)),
        ("mask", lambda: cpp.masked_whiten_forward(x, mask.int(), True, 1e-8, out)),
        ("mask", lambda: cpp.masked_whiten_forward(x, mask[:2], True, 1e-8, out)),
        ("out", lambda: cpp.masked_whiten_forward(x, mask, True, 1e-8, out.float())),
        ("out", lambda: cpp.masked_whiten_forward(x, mask, True, 1e-8, out[:2])),
    ]:
        with pytest.raises(RuntimeError, match=name):
            call()
    stats = cpp.masked_whiten_forward(x, mask, True, 1e-8, out)
    grad = torch.randn_like(x)
    for name, call in [
        ("stats", lambda: cpp.masked_whiten_backward(grad, x, mask, stats[:1], True, out)),
        ("stats", lambda: cpp.masked_whiten_backward(grad, x, mask, stats.float(), True, out)),
        ("grad", lambda: cpp.masked_whiten_backward(grad.float(), x, mask, stats, True, out)),
        ("grad_x", lambda: cpp.masked_whiten_backward(grad, x, mask, stats, True, out[:, :2])),
    ]:
        with pytest.raises(RuntimeError, match=name):
            call()


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_elements_unchecked_give_nan(unchecked_values, count):
    """The path used on CUDA (no host sync, so no check) returns what the formula gives: NaN."""
    x, _ = inputs(3, 4, seed=28)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask.view(-1)[:count] = True
    assert _torch_formula(x, mask, True, 1e-8).isnan().all()
    with fastrlhf.backend.use_backend("reference"):
        assert fastrlhf.masked_whiten(x, mask).isnan().all()


def test_torch_formula_matches_verl():
    x, mask = inputs(8, 50, seed=29, dtype=torch.float64)
    for shift_mean in (True, False):
        torch.testing.assert_close(_torch_formula(x, mask, shift_mean, 1e-8),
                                   reference.masked_whiten(x, mask, shift_mean=shift_mean))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    x, mask = (t.cuda() for t in inputs(8, 50, seed=30))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastrlhf.masked_whiten(x.requires_grad_(), mask).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
