"""Shared by the integration tests: the packages' own functions are compared before and after patching."""

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch


def stub_absent(monkeypatch, modules: dict[str, dict]) -> None:
    """Puts empty modules (with the given attributes) into sys.modules for packages that are not installed,
    so that a package whose import chain names a GPU-only dependency (flash-attn, vLLM) imports on a CPU
    machine. The functions under test never call into them."""
    for name, attributes in modules.items():
        top = sys.modules.get(name.split(".")[0])
        installed = (not getattr(top, "_fastrlhf_stub", False)) if top is not None else (
            importlib.util.find_spec(name.split(".")[0]) is not None)
        if installed:
            continue
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module._fastrlhf_stub = True
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)


def assert_same(got, want, rtol, atol):
    """``got`` (after patching) against ``want`` (the package's own function), compared in fp64."""
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)
