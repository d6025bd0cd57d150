"""Argument checks shared by the ops: each error names the argument, what was expected and what came."""

from __future__ import annotations

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


def unit_interval(name: str, value: float | torch.Tensor) -> None:
    """``value`` (a float or a tensor) lies in [0, 1]; tensor values are not read under torch.compile."""
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling():
            return
        if value.is_floating_point() and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"{name}: expected values in [0, 1], got min {value.min().item()}, max {value.max().item()}")
    elif not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")


def one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
