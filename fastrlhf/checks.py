"""Argument checks shared by the ops: each error names the argument, what was expected and what came.

Checks of shapes, dtypes and devices read only metadata. Checks of tensor *values* (labels in range,
offsets increasing, ...) must read the values on the host, which on CUDA is a device sync: it drains the
launch queue and breaks CUDA-graph capture. So value checks run only where ``values_checked`` says so:
on CPU tensors (no queue to drain) and, on other devices, only when asked with ``FASTRLHF_CHECKS=1``.
Without it, the kernels themselves turn invalid values into NaN outputs (never a silent finite answer
and never an out-of-bounds access).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64)


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def dtype(name: str, value: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    tensor(name, value)
    if value.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}), got {value.dtype}")


def shape(name: str, value: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(value.shape)}")


def ndim(name: str, value: torch.Tensor, allowed: Sequence[int]) -> None:
    if value.dim() not in allowed:
        raise ValueError(f"{name}: expected {' or '.join(f'{n}-D' for n in allowed)}, got shape {tuple(value.shape)}")


def device(name: str, value: torch.Tensor, expected: torch.device) -> None:
    if value.device != expected:
        raise ValueError(f"{name}: expected a tensor on {expected}, got one on {value.device}")


def values_checked(value: torch.Tensor) -> bool:
    """Whether an op may read ``value``'s elements on the host to validate them: never while compiling
    (the kernels poison what they cannot use), always on CPU, elsewhere only with ``FASTRLHF_CHECKS=1``."""
    if torch.compiler.is_compiling():
        return False
    return value.device.type == "cpu" or os.environ.get("FASTRLHF_CHECKS") == "1"


def offsets(cu_seqlens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` checked as the int ``[S + 1]`` offsets of packed ``tokens`` (values only where
    ``values_checked``); returned int64 contiguous."""
    dtype("cu_seqlens", cu_seqlens, INTS)
    ndim("cu_seqlens", cu_seqlens, (1,))
    device("cu_seqlens", cu_seqlens, tokens.device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 offsets [0, ..., N], got shape {tuple(cu_seqlens.shape)}")
    if values_checked(cu_seqlens):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != tokens.numel():
            raise ValueError(f"cu_seqlens: expected to run from 0 to N={tokens.numel()}, got {first} to {last}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens: expected non-decreasing offsets")
    return cu_seqlens.to(torch.int64).contiguous()


def unit_interval(name: str, value: float | torch.Tensor) -> None:
    """``value`` (a float or a tensor) lies in [0, 1]; tensor values only where ``values_checked``."""
    if isinstance(value, torch.Tensor):
        if not values_checked(value):
            return
        if value.is_floating_point() and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"{name}: expected values in [0, 1], got min {value.min().item()}, max {value.max().item()}")
    elif not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")


def one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
