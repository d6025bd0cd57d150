"""Swapping functions inside an installed package, and putting them back.

A trainer module that did ``from pkg.utils import f`` (or ``import f as g``) holds its own reference to
``f``, and a registry such as verl's ``ADV_ESTIMATOR_REGISTRY`` holds another, so replacing
``pkg.utils.f`` alone would leave both on the original. ``Patched`` therefore also rebinds every
attribute of an already-imported module of the package, and every value of a module-level dict there,
that is the very same object; modules imported later pick the replacement up from the defining module.
A method (``pkg.loss:Loss.forward``) is set on its class, which every user shares. The handle records
each rebinding and restores exactly those.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings
from types import ModuleType
from typing import Any, Callable

# A replacement is built from the original, so that it can keep its name and docstring
# (functools.wraps) and hand the cases that fastrlhf does not cover back to it.
Factory = Callable[[Callable[..., Any]], Callable[..., Any]]


def require(distribution: str, modules: tuple[str, ...], tested: tuple[str, ...]) -> None:
    """Imports ``modules``; a clear ImportError if one cannot be, a warning if the version is untested.

    ``tested`` lists version prefixes (e.g. ``"0.9."``) that the integration's tests ran against.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"fastrlhf's {distribution} integration needs {name}, which could not be imported ({err}). "
                f"Install {distribution} with its dependencies, e.g. `pip install 'fastrlhf[integrations]'`."
            ) from err
    version = importlib.metadata.version(distribution)
    if not version.startswith(tested):
        warnings.warn(
            f"fastrlhf's {distribution} integration was tested with {distribution} "
            f"{', '.join(v + '*' for v in tested)}, found {version}: the replaced functions may no longer "
            f"match the package's semantics.", stacklevel=3)


def resolve(target: str) -> tuple[Any, str, Any]:
    """``"pkg.module:name"`` or ``"pkg.module:Class.name"`` -> (owner, name, current object)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name, getattr(owner, name)


class Patched:
    """What a ``patch()`` replaced; ``unpatch()`` (or leaving the ``with`` block) restores it."""

    def __init__(self, package: str, replacements: dict[str, Factory]):
        self.package = package
        self._undo: list[Callable[[], None]] = []
        for target, factory in replacements.items():
            owner, name, original = resolve(target)
            replacement = factory(original)
            if isinstance(owner, ModuleType):
                for namespace, key in _references(package, original):
                    self._rebind(namespace, key, original, replacement)
            else:
                self._rebind_class(owner, name, replacement)
        self.replaced = tuple(replacements)

    def _rebind(self, namespace: dict, key: Any, original: Any, replacement: Any) -> None:
        def undo():
            namespace[key] = original

        self._undo.append(undo)
        namespace[key] = replacement

    def _rebind_class(self, owner: type, name: str, replacement: Any) -> None:
        # The class's own entry (a staticmethod or classmethod descriptor, or nothing when inherited) is
        # what goes back, not the bound method that getattr returned.
        missing = object()
        raw = vars(owner).get(name, missing)

        def undo():
            if raw is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, raw)

        self._undo.append(undo)
        setattr(owner, name, replacement)

    def unpatch(self) -> None:
        """Restores every rebinding, newest first (idempotent)."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Patched":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self._undo else "undone"
        return f"<fastrlhf patch of {self.package} ({state}): {', '.join(self.replaced)}>"


def _references(package: str, original: Any) -> list[tuple[dict, Any]]:
    """(namespace, key) of every module attribute, and every module-level dict value, of the imported
    modules of ``package`` that is ``original`` itself."""
    prefix = package + "."
    found = []
    for module_name, module in list(sys.modules.items()):
        if not (module_name == package or module_name.startswith(prefix)):
            continue
        namespace = getattr(module, "__dict__", None)
        if namespace is None:
            continue
        for key, value in list(namespace.items()):
            if value is original:
                found.append((namespace, key))
            elif type(value) is dict:
                found.extend((value, k) for k, v in list(value.items()) if v is original)
    return found
