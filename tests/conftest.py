"""Fixtures shared by every test: poisoned outputs, and the kernel backends to run an op on."""

import importlib.util

import pytest

from fastrlhf import backend, checks

HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton missing"))]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN, so an element that a kernel does not write fails the test."""
    with backend.poison_outputs():
        yield


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Runs the test body with the op forced onto each kernel backend (Triton under the interpreter)."""
    with backend.use_backend(request.param):
        yield request.param


@pytest.fixture(params=["reference", *KERNEL_BACKENDS])
def any_backend(request):
    with backend.use_backend(request.param):
        yield request.param



@pytest.fixture
def unchecked_values(monkeypatch):
    """Value checks off, as on CUDA without FASTRLHF_CHECKS=1: the kernels must poison what is invalid."""
    monkeypatch.setattr(checks, "values_checked", lambda value: False)
