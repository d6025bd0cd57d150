"""What an op contributes to ``fastrlhf bench`` and ``fastrlhf verify``.

Each op has a module ``fastrlhf/bench/<op>.py`` with ``cases(quick: bool) -> list[Case]`` (timed
against the references) and ``checks() -> list[Check]`` (verified against float64 on every backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Case:
    """One benchmark: the fused op and its references on the same inputs, timed in one process."""

    op: str                                      # e.g. "gae + masked_whiten"
    shape: str                                   # e.g. "B=256 T=2048 fp32"
    make_inputs: Callable[[], tuple]             # fresh inputs, built outside the timed region
    fused: Callable[..., Any]                    # fused(*inputs)
    references: dict[str, Callable[..., Any]]    # name -> reference(*inputs); the first is the baseline
    bytes_moved: int                             # floor: each input read once, each output written once
    same: Callable[[Any, Any], None] | None = None  # raises if fused and baseline outputs disagree
    x: float | None = None                       # x coordinate of the speed-up plot (e.g. T)


@dataclass
class Check:
    """One verification on one device: ``run(device)`` returns, per output or gradient, (error, bound).

    The error is the kernel's max abs error against a float64 reference; the bound is twice the error of
    the same computation done by PyTorch in the input's precision, plus a small absolute slack
    (flash-attention's rule for low precision), so tolerances follow the dtype and are never hand-tuned.
    """

    op: str
    shape: str
    dtype: torch.dtype
    run: Callable[[torch.device], dict[str, tuple[float, float]]]


SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def error_and_bound(got: torch.Tensor, exact: torch.Tensor, torch_same_precision: torch.Tensor) -> tuple[float, float]:
    """(max |got - exact|, 2 * max |torch_same_precision - exact| + slack) over finite reference entries."""
    finite = exact.isfinite()
    err = (got.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    base = (torch_same_precision.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    return err, 2 * base + SLACK[got.dtype] * max(1.0, exact[finite].abs().max().item() if finite.any() else 1.0)


def outputs_and_grads(outs, leaves, upstream) -> list[torch.Tensor]:
    """Detached CPU copies of ``outs`` and of the gradients of ``sum_i (outs[i] * upstream[i]).sum()`` (in
    float64) with respect to ``leaves``."""
    loss = sum((o.double() * u.to(o.device)).sum() for o, u in zip(outs, upstream))
    return [t.detach().cpu() for t in (*outs, *torch.autograd.grad(loss, leaves))]


def errors(names, run, fused, exact, same_precision, dtype: torch.dtype, device) -> dict[str, tuple[float, float]]:
    """``error_and_bound`` of each result of ``run(fn, dtype, device)``: ``fused`` on ``device`` against
    ``exact`` run in float64 on the CPU, bounded by ``same_precision`` run in ``dtype`` on the CPU."""
    got = run(fused, dtype, device)
    want = run(exact, torch.float64, "cpu")
    same = run(same_precision, dtype, "cpu")
    return {n: error_and_bound(g, e, s) for n, g, e, s in zip(names, got, want, same)}
