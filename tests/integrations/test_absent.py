"""Patching a package that is not installed raises a clear ImportError (the package is hidden here)."""

import sys

import pytest

from fastrlhf.integrations import liger, openrlhf, trl, verl


@pytest.mark.parametrize("integration", [verl, trl, openrlhf, liger], ids=["verl", "trl", "openrlhf", "liger"])
def test_patch_without_the_package_raises(monkeypatch, integration):
    for name in integration.MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=f"needs {integration.MODULES[0]}, which could not be imported"):
        integration.patch()
