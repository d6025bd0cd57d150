"""What an op contributes to ``fastrlhf bench`` and ``fastrlhf verify``.

Each op has a module ``fastrlhf/bench/<op>.py`` with two functions (and is listed in ``fastrlhf.bench.OPS``):

``cases(quick: bool) -> list[Case]``: what ``fastrlhf bench`` times (and ``benchmarks/test_ops.py`` runs). Each
``Case`` builds its inputs with ``make_inputs()`` and must set ``same(fused_out, baseline_out)``, which raises
(``torch.testing.assert_close``) when the fused result disagrees with the first reference's on those inputs;
``Case.check`` runs it before anything is timed, on a fresh ``make_inputs()`` for each side, so a fused call
that overwrites its inputs (an in-place backward) is compared too: ``make_inputs`` must return the same
values on every call (seed its generator).

``checks() -> list[Check]``: what ``fastrlhf verify`` runs on every backend. A check computes the exact
answer in float64 from the inputs rounded to the checked dtype (``x.to(dtype).double()``), runs the op in
that dtype, and bounds every output and gradient element by ``bound(exact, scale, compute_dtype(dtype),
stored_dtype)``: ``K`` roundings of the compute dtype times ``scale``, the magnitudes the element is
computed from (derived per op from the float64 quantities, e.g. ``|lse| + max|z|`` per row for a log-prob),
plus half an ulp of the dtype the output is stored in. ``within(got, exact, allowed)`` gives the
``(error, bound)`` pair ``Check.run`` returns per output. Scales are derived, never fitted to pass.
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
    make_inputs: Callable[[], tuple]             # the same fresh inputs on every call (seeded), built untimed
    fused: Callable[..., Any]                    # fused(*inputs)
    references: dict[str, Callable[..., Any]]    # name -> reference(*inputs); the first is the baseline
    bytes_moved: int                             # floor: each input read once, each output written once
    same: Callable[[Any, Any], None]             # same(out, baseline_out) raises if they disagree
    x: float | None = None                       # x coordinate of the speed-up plot (e.g. T)

    def check(self, fn: Callable[..., Any]) -> None:
        """Raises unless ``fn`` (the fused op or a reference) agrees with the baseline, each run on its own
        fresh inputs, so an op that overwrites its inputs (an in-place backward) is compared fairly."""
        baseline = next(iter(self.references.values()))
        self.same(fn(*self.make_inputs()), baseline(*self.make_inputs()))


@dataclass
class Check:
    """One verification on one device: ``run(device)`` returns, per output or gradient, ``(error, bound)``
    from ``within``: the element whose error is the largest fraction of its own bound, so the check passes
    when ``error <= bound``."""

    op: str
    shape: str
    dtype: torch.dtype
    run: Callable[[torch.device], dict[str, tuple[float, float]]]


# Roundings of the compute dtype allowed per unit of scale. Every scale below is a sum of the magnitudes an
# output is computed from (so cancellation costs nothing); K covers the few operations each passes through.
K = 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bound(exact: torch.Tensor, scale: torch.Tensor | float, compute: torch.dtype, stored: torch.dtype,
          k: float = K) -> torch.Tensor:
    """The error allowed for each element of an output whose exact value (float64, from the rounded inputs)
    is ``exact``: ``k`` roundings in ``compute`` of ``scale`` (broadcast to ``exact``: the magnitudes the
    element is computed from, e.g. ``|lse| + max|z|`` for a log-prob), plus the final rounding to ``stored``
    (half an ulp of ``|exact|``; of the smallest subnormal below the normal range)."""
    eps, info = torch.finfo(compute).eps, torch.finfo(stored)
    ulp = (info.eps * exact.abs()).clamp_min(info.eps * info.tiny)
    return k * eps * torch.as_tensor(scale, dtype=torch.float64) + 0.5 * ulp


def within(got: torch.Tensor, exact: torch.Tensor, allowed: torch.Tensor) -> tuple[float, float]:
    """``(|got - exact|, allowed)`` at the element where that error is the largest fraction of ``allowed``.
    Where ``exact`` is not finite, ``got`` must equal it (the same infinity, NaN for NaN), else the error is
    infinite."""
    got, exact = got.detach().cpu().double(), exact.detach().cpu().double()
    allowed = torch.broadcast_to(allowed, exact.shape).double()
    finite = exact.isfinite()
    same = (got == exact) | (got.isnan() & exact.isnan())
    if not bool(same[~finite].all()) or not bool(got[finite].isfinite().all()):
        return float("inf"), 0.0
    if not bool(finite.any()):
        return 0.0, 0.0
    error = (got - exact)[finite].abs()
    allowed = allowed[finite]
    worst = (error / allowed.clamp_min(torch.finfo(torch.float64).tiny)).argmax()
    return error[worst].item(), allowed[worst].item()


def error_and_bound(got: torch.Tensor, exact: torch.Tensor, torch_same_precision: torch.Tensor) -> tuple[float, float]:
    """(max |got - exact|, 2 * max |torch_same_precision - exact| + slack) over finite reference entries: no
    worse than another implementation of the same thing at the same precision. Only for comparing against a
    package's own function (the integration tests); ``verify`` bounds errors with ``bound``."""
    finite = exact.isfinite()
    err = (got.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    base = (torch_same_precision.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    return err, 2 * base + SLACK[got.dtype] * max(1.0, exact[finite].abs().max().item() if finite.any() else 1.0)


SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def outputs_and_grads(outs, leaves, upstream) -> list[torch.Tensor]:
    """Detached CPU copies of ``outs`` and of the gradients of ``sum_i (outs[i] * upstream[i]).sum()`` (in
    float64) with respect to ``leaves``."""
    loss = sum((o.double() * u.to(o.device)).sum() for o, u in zip(outs, upstream))
    return [t.detach().cpu() for t in (*outs, *torch.autograd.grad(loss, leaves))]
