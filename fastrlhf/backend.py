"""Which implementation runs an op: the pure-torch reference, the C++ extension or the Triton kernels.

By default CPU tensors run the C++ kernels and CUDA tensors the Triton kernels. ``use_backend`` (a
context manager) or the environment variable ``FASTRLHF_BACKEND`` forces one of ``BACKENDS``; forcing
``"triton"`` on CPU tensors runs the Triton kernels under the Triton interpreter, which is how the
kernels are tested on machines without a GPU.

Triton decides between compiling and interpreting when ``triton.language`` is first imported, so on a
machine without CUDA, importing fastrlhf sets ``TRITON_INTERPRET=1`` (unless it is set already): there
the interpreter is the only way Triton kernels can run at all.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("reference", "cpp", "triton")
_forced = threading.local()

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: expected one of {BACKENDS}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost first) or ``FASTRLHF_BACKEND``, else None."""
    stack = getattr(_forced, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTRLHF_BACKEND")
    return _check_name(env, "FASTRLHF_BACKEND") if env else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every fastrlhf op inside the block on backend ``name`` (one of ``BACKENDS``)."""
    _check_name(name, "use_backend(name)")
    stack = _forced.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``tensor``."""
    forced = forced_backend()
    if forced is not None:
        if forced == "cpp" and tensor.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors only, got a tensor on {tensor.device}")
        return forced
    return "cpp" if tensor.device.type == "cpu" else "triton"


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every kernel output with NaN before the kernel runs, so an element it fails to write shows."""
    _forced.poison = True
    try:
        yield
    finally:
        _forced.poison = False


def empty_outputs(like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` uninitialised tensors shaped like ``like`` (NaN-filled inside ``poison_outputs``)."""
    if getattr(_forced, "poison", False):
        return [torch.full_like(like, float("nan")) for _ in range(count)]
    return [torch.empty_like(like) for _ in range(count)]


def cpp_ops():
    """``torch.ops.fastrlhf_cpp``, loading the compiled extension; a clear error if it was not built."""
    try:
        importlib.import_module("fastrlhf._C")
    except ImportError as err:
        raise RuntimeError(
            "fastrlhf's C++ extension (fastrlhf._C) is not built, so CPU tensors cannot run the fused "
            "kernels. Build it from the source tree with `pip install --no-build-isolation -e .`, "
            "or run the pure-torch reference with `fastrlhf.use_backend('reference')`."
        ) from err
    return torch.ops.fastrlhf_cpp


def kernels(op: str, tensor: torch.Tensor):
    """The kernels that run ``op`` on ``tensor``: the C++ ops or ``fastrlhf.kernels.<op>``, whose launchers
    take the same arguments."""
    if backend_for(tensor) == "cpp":
        return cpp_ops()
    return triton_kernels(op, tensor.device)


def triton_kernels(name: str, device: torch.device) -> ModuleType:
    """Import ``fastrlhf.kernels.<name>``, whose kernels run on ``device`` (CPU: the interpreter)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if (device.type == "cpu") != interpreting:
        raise RuntimeError(
            f"Triton runs {'under' if interpreting else 'without'} its interpreter in this process, so "
            f"its kernels cannot take {device} tensors here. The mode is fixed when triton is first "
            "imported: set TRITON_INTERPRET=1 before importing torch for CPU tensors, and leave it unset "
            "for GPU tensors."
        )
    try:
        return importlib.import_module(f"fastrlhf.kernels.{name}")
    except ImportError as err:
        if "triton" in str(err):
            raise RuntimeError("the triton backend needs `pip install triton`") from err
        raise
