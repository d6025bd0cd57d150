"""Swapping functions inside an installed package, and putting them back.

A trainer module that did ``from pkg.utils import f`` holds its own reference to ``f``, so replacing
``pkg.utils.f`` alone would leave that trainer on the original. ``patch_functions`` therefore also
rebinds every already-imported module of the package whose attribute is the very same object; modules
imported later pick the replacement up from the defining module. The handle records each rebinding and
restores exactly those.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings
from types import ModuleType
from typing import Any, Callable


def require(package: str, distribution: str, tested: tuple[str, ...]) -> ModuleType:
    """Imports ``package``; a clear ImportError if it is missing, a warning if its version is untested.

    ``tested`` lists version prefixes (e.g. ``"0.9."``) that the integration's tests ran against.
    """
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"fastrlhf.integrations.{package} patches the {distribution!r} package, which could not be "
            f"imported ({err}). Install it, e.g. `pip install 'fastrlhf[integrations]'`."
        ) from err
    version = importlib.metadata.version(distribution)
    if not version.startswith(tested):
        warnings.warn(
            f"fastrlhf.integrations.{package} was tested with {distribution} {', '.join(v + '*' for v in tested)}, "
            f"found {version}: the patched functions may no longer match the package's semantics.",
            stacklevel=3)
    return module


class Patched:
    """What a ``patch()`` replaced; ``unpatch()`` (or leaving the ``with`` block) restores it."""

    def __init__(self, package: str, replacements: dict[str, Callable[..., Any]]):
        self.package = package
        self._saved: list[tuple[ModuleType, str, Any]] = []
        for qualified, replacement in replacements.items():
            module_name, name = qualified.rsplit(".", 1)
            original = getattr(importlib.import_module(module_name), name)
            for module in _modules_holding(package, original, name):
                self._saved.append((module, name, original))
                setattr(module, name, replacement)
        self.replaced = tuple(replacements)

    def unpatch(self) -> None:
        """Restores every rebinding, newest first (idempotent)."""
        while self._saved:
            module, name, original = self._saved.pop()
            setattr(module, name, original)

    def __enter__(self) -> "Patched":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self._saved else "undone"
        return f"<fastrlhf patch of {self.package} ({state}): {', '.join(self.replaced)}>"


def _modules_holding(package: str, original: Any, name: str) -> list[ModuleType]:
    """Imported modules of ``package`` whose attribute ``name`` is ``original`` itself."""
    prefix = package + "."
    return [module for module_name, module in list(sys.modules.items())
            if (module_name == package or module_name.startswith(prefix)) and module is not None
            and getattr(module, name, None) is original]
