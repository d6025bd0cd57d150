"""The patching helper on a package made up here: every reference is rebound, and put back."""

import importlib
import sys
import textwrap
import warnings

import pytest

from fastrlhf.integrations._patch import Patched, require

PACKAGE = {
    "__init__.py": "",
    "core.py": """
        def f(x):
            return x + 1

        class Loss:
            def forward(self, x):
                return x * 2

            @classmethod
            def make(cls):
                return cls()

        class Derived(Loss):
            pass
        """,
    "registry.py": """
        from fakepkg.core import f
        REGISTRY = {"f": f, "other": len}
        """,
    "user.py": """
        from fakepkg.core import f as renamed
        """,
    "later.py": """
        from fakepkg.core import f
        """,
}


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    root = tmp_path / "fakepkg"
    root.mkdir()
    for name, source in PACKAGE.items():
        (root / name).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = {name: importlib.import_module(f"fakepkg.{name}") for name in ("core", "registry", "user")}
    yield modules
    for name in [m for m in sys.modules if m == "fakepkg" or m.startswith("fakepkg.")]:
        del sys.modules[name]


def plus_ten(original):
    def replacement(x):
        return original(x) + 10
    return replacement


def triple(original):
    def replacement(self, x):
        return x * 3
    return replacement


def test_every_reference_is_rebound_and_restored(fakepkg):
    core, registry, user = fakepkg["core"], fakepkg["registry"], fakepkg["user"]
    original, method = core.f, core.Loss.forward
    make = core.Loss.__dict__["make"]
    handle = Patched("fakepkg", {"fakepkg.core:f": plus_ten, "fakepkg.core:Loss.forward": triple,
                                 "fakepkg.core:Derived.make": lambda original: lambda: "made"})
    assert core.f(1) == 12 and registry.f(1) == 12 and user.renamed(1) == 12
    assert registry.REGISTRY["f"] is core.f and registry.REGISTRY["other"] is len
    assert core.Loss().forward(2) == 6 and core.Derived.make() == "made" and isinstance(core.Loss.make(), core.Loss)
    assert importlib.import_module("fakepkg.later").f is core.f  # imported after patching
    handle.unpatch()
    assert core.f is original and registry.f is original and user.renamed is original
    assert registry.REGISTRY["f"] is original and core.Loss.forward is method
    assert "make" not in vars(core.Derived) and core.Loss.__dict__["make"] is make  # inherited again
    handle.unpatch()  # idempotent
    assert core.f is original


def test_context_manager_and_nesting(fakepkg):
    core = fakepkg["core"]
    original = core.f
    with Patched("fakepkg", {"fakepkg.core:f": plus_ten}) as outer:
        with Patched("fakepkg", {"fakepkg.core:f": plus_ten}):
            assert core.f(0) == 21
        assert core.f(0) == 11
        assert "active" in repr(outer)
    assert core.f is original and "undone" in repr(outer)


def test_require_names_the_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "fakepkg_absent", None)
    with pytest.raises(ImportError, match="needs fakepkg_absent, which could not be imported"):
        require("fakepkg-absent", ("fakepkg_absent",), ("1.",))


def test_require_warns_on_an_untested_version(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"pytest": "99.0"}[name])
    with pytest.warns(UserWarning, match="tested with pytest 1.\\*, found 99.0"):
        require("pytest", ("pytest",), ("1.",))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        require("pytest", ("pytest",), ("1.",))

