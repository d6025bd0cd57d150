"""Shared by the integration tests: the packages' own functions are compared before and after patching.

A test module here skips when the package it patches is not installed, except with
``FASTRLHF_REQUIRE_INTEGRATIONS=1`` (set by ``.ci/run``, which installs them all), where that skip is a failure.
"""

import os

import pytest
import torch

from fastrlhf.bench.case import error_and_bound


def _run(call, args, grads):
    """Outputs of ``call(*args)`` and, with ``grads``, the gradients of its floating inputs under a fixed
    random upstream gradient."""
    leaves = [a.detach().clone().requires_grad_(grads) if _floating(a) else a for a in args]
    out = call(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    results = [o.detach() for o in outs]
    if grads:
        g = torch.Generator().manual_seed(0)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
                   for o in outs if o.requires_grad)
        inputs = [x for x in leaves if _floating(x)]
        unused_as_zero = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        results += unused_as_zero
    return results


def _floating(x):
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def assert_matches_original(call, patch, args, grads=True):
    """``call(*args)`` (which looks the package's function up when called) after ``patch()`` against the
    same call before it: outputs and gradients, each within twice the original's own error against the
    original run in float64 plus a small slack (the project's rule for precision-dependent tolerances)."""
    exact = _run(call, [a.double() if _floating(a) else a for a in args], grads)
    before = _run(call, args, grads)
    with patch():
        after = _run(call, args, grads)
    assert len(after) == len(before) == len(exact)
    for i, (got, want, same) in enumerate(zip(after, exact, before)):
        assert got.shape == want.shape, i
        error, bound = error_and_bound(got, want, same)
        assert error <= bound, f"output/gradient {i}: error {error:.3e} > bound {bound:.3e}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.skipped and os.environ.get("FASTRLHF_REQUIRE_INTEGRATIONS") == "1":
        report.outcome = "failed"
        report.longrepr = f"FASTRLHF_REQUIRE_INTEGRATIONS=1, but {collector.nodeid} skipped: {report.longrepr[-1]}"
    return report


def assert_dtypes(call, patch, args):
    """``call(*args)`` returns fp32 floating outputs (fp64 for fp64 inputs) after ``patch()``, and after
    ``patch(match_dtype=True)`` the dtypes the package's own function returns, with the values the
    default patch gives, rounded."""
    def outputs():
        out = call(*args)
        return [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]

    before = outputs()
    with patch():
        default = outputs()
    with patch(match_dtype=True):
        matched = outputs()
    assert [o.dtype for o in matched] == [o.dtype for o in before]
    wide = torch.float64 if any(a.dtype == torch.float64 for a in args if _floating(a)) else torch.float32
    assert [o.dtype for o in default] == [wide if o.is_floating_point() else o.dtype for o in before]
    for got, fp32 in zip(matched, default):
        assert torch.equal(got, fp32.to(got.dtype))


@pytest.fixture
def matches_original():
    return assert_matches_original


@pytest.fixture
def dtypes_match():
    return assert_dtypes

