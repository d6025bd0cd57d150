"""``fastrlhf.group_advantages``: GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline and OPO advantages, each
response scored against the other responses to the same prompt, for any group ids in any order.

Registered as the custom op ``fastrlhf::group_advantages`` (it writes into ``out``), with a fake
implementation, so it runs under ``torch.compile(fullgraph=True)``. CPU tensors run the C++ kernel,
CUDA tensors the Triton kernels (see ``fastrlhf.backend``).

Grouping. Group ids are arbitrary (hashed uids), so the kernels group rows by sorting ``(id, row)``:
on CPU a ``std::sort`` of B pairs inside the C++ kernel (O(B log B) on B numbers: ~0.3 ms at B = 8192,
small next to the token passes); on CUDA ``torch.sort(index, stable=True)``, a device radix sort that
needs no host sync, where ``torch.unique`` (the usual compaction) syncs to learn its output size. Sorting
puts each group's members in row order, so every group statistic is summed in an order fixed by the
group's own members: bit-identical results whatever other groups share the batch, and no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference

ESTIMATORS = ("grpo", "rloo", "reinforce++-baseline", "opo")
TOKEN_ESTIMATORS = ("reinforce++-baseline", "opo")  # they need lengths, hence [B, T] scores and a mask
SCALES = ("group", "batch", "none")
SINGLETONS = ("raw", "zero", "error")
NAN_MODES = ("propagate", "ignore")


def group_advantages(scores: Tensor, index: Tensor, *, estimator: str = "grpo", mask: Optional[Tensor] = None,
                     scale: str = "group", eps: float = 1e-6, unbiased: bool = True, singleton: str = "raw",
                     nan: str = "propagate", out: Optional[Tensor] = None) -> Tensor:
    """Each response's advantage against the other responses of its group (same ``index``).

    Args:
        scores: ``[B]`` sequence scores, or ``[B, T]`` token rewards with ``mask`` (a response's score is
            the sum of its rewards at masked-in tokens; values outside the mask are never read into it).
            fp32, fp64, bf16 or fp16.
        index: int32/int64 ``[B]`` non-negative group ids, in any order, any group sizes.
        estimator: ``"grpo"``: ``(s - mean_g) / (std_g + eps)`` with ``scale="group"``, the batch std of all
            scores instead with ``scale="batch"`` (TRL's ``scale_rewards="batch"``), ``s - mean_g`` with
            ``scale="none"`` (Dr.GRPO); ``unbiased``: Bessel's correction in either std. ``"rloo"``:
            ``n / (n - 1) * (s - mean_g)``, the score minus the mean of the other members.
            ``"reinforce++-baseline"``: ``s - mean_g``, then whitened over the batch's masked-in tokens
            (mean, unbiased variance, ``rsqrt(var + 1e-8)``: verl's formula). ``"opo"``: ``s - b_g`` with
            ``b_g`` the group's mean score weighted by length (masked-in tokens). The last two need
            ``[B, T]`` scores and ``mask``. ``scale``, ``eps`` and ``unbiased`` apply to ``grpo`` only.
        singleton: a group with one (scored) member: ``"raw"`` passes its score through as verl's loop
            does (mean 0 and std 1: ``s / (1 + eps)`` for grpo with ``scale="group"``, ``s / (std_batch +
            eps)`` with ``"batch"``, ``s`` otherwise); ``"zero"`` gives ``s - s`` (0; NaN for a non-finite
            score) and leaves the row out of reinforce++-baseline's whitening; ``"error"`` raises where
            values are checked (``fastrlhf.checks.values_checked``: CPU, or ``FASTRLHF_CHECKS=1``);
            unchecked (CUDA by default, or compiled) the group's advantage is NaN.
        nan: ``"propagate"``: a NaN score makes its group NaN and no other (with batch statistics,
            ``scale="batch"`` and reinforce++-baseline, the whole batch). ``"ignore"``: NaN scores are
            left out of every statistic (a group's size counts its scored members) and get 0.
        out: optional contiguous tensor shaped like ``scores`` (fp32; fp64 for fp64 scores) to write into.

    Returns ``[B]`` advantages for ``[B]`` scores; for ``[B, T]`` the row's advantage at every masked-in
    token and 0 elsewhere (verl's layout); fp32 (fp64 for fp64 scores). Statistics are two-pass in
    float64, relative to a member of the group (a group of equal scores gives exactly 0 in every dtype);
    a zero denominator (no spread and ``eps=0``) gives 0. A group's result with ``grpo``/``rloo``/``opo``
    and ``scale="group"`` does not depend, bit for bit, on the other groups of the batch; the result is
    deterministic. No gradient: advantages are data.
    """
    scores, index, mask = _checked(scores, index, estimator, mask, scale, eps, unbiased, singleton, nan)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if out is None:
        # empty_outputs poisons it (NaN) under test; an empty tensor costs no page faults until written
        out = backend.empty_outputs(torch.empty(scores.shape, dtype=dtype, device=scores.device), 1)[0]
    else:
        checks.dtype("out", out, (dtype,))
        checks.shape("out", out, scores.shape)
        checks.device("out", out, scores.device)
        if not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous tensor, got strides {out.stride()}")
    if backend.forced_backend() == "reference":
        return out.copy_(reference.group_advantages(scores, index, estimator=estimator, mask=mask, scale=scale,
                                                    eps=eps, unbiased=unbiased, singleton=singleton, nan=nan))
    if torch.compiler.is_compiling():
        torch.ops.fastrlhf.group_advantages(scores, index, mask, estimator, scale, float(eps), unbiased, singleton,
                                            nan, out)
    else:  # eager: skip the op's dispatch cost (~20 us)
        _run(scores, index, mask, estimator, scale, eps, unbiased, singleton, nan, out)
    return out


def _checked(scores, index, estimator, mask, scale, eps, unbiased, singleton, nan):
    """Checks the arguments; returns contiguous detached scores, index and a bool mask (or None)."""
    checks.dtype("scores", scores, checks.FLOATS)
    checks.ndim("scores", scores, (1, 2))
    checks.one_of("estimator", estimator, ESTIMATORS)
    checks.one_of("scale", scale, SCALES)
    checks.one_of("singleton", singleton, SINGLETONS)
    checks.one_of("nan", nan, NAN_MODES)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased: expected a bool, got {type(unbiased).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    checks.dtype("index", index, checks.INTS)
    checks.shape("index", index, scores.shape[:1])
    checks.device("index", index, scores.device)
    if scores.dim() == 1:
        if mask is not None:
            raise ValueError("mask: expected None with [B] scores (a mask goes with [B, T] token rewards)")
        if estimator in TOKEN_ESTIMATORS:
            raise ValueError(f"scores: estimator {estimator!r} needs [B, T] token rewards with a mask (lengths), "
                             f"got shape {tuple(scores.shape)}")
    else:
        if mask is None:
            raise ValueError(f"mask: expected a {list(scores.shape)} mask with [B, T] scores, got None")
        checks.tensor("mask", mask)
        checks.shape("mask", mask, scores.shape)
        checks.device("mask", mask, scores.device)
        if mask.is_complex():
            raise TypeError(f"mask: expected bool or 0/1 numbers, got {mask.dtype}")
        mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    if checks.values_checked(index) and index.numel() and bool((index < 0).any()):
        row = int((index < 0).nonzero()[0, 0])
        raise ValueError(f"index: expected non-negative group ids, got {int(index[row])} at row {row}")
    return scores.detach().contiguous(), index.contiguous(), mask


def _run(scores, index, mask, estimator, scale, eps, unbiased, singleton, nan, out):
    if singleton == "error" and backend.backend_for(scores) == "triton" and checks.values_checked(scores):
        _check_no_singleton(scores, index, mask, nan)  # the C++ kernel checks as it groups
    backend.kernels("group_advantages", scores).group_advantages(scores, index, mask, estimator, scale, float(eps), unbiased, singleton, nan, out)


def _check_no_singleton(scores, index, mask, nan):
    score = scores if mask is None else torch.where(mask, scores, 0).sum(-1)
    scored = ~score.isnan() if nan == "ignore" else torch.ones_like(index, dtype=torch.bool)
    ids, counts = torch.unique(index[scored], return_counts=True)
    if bool((counts == 1).any()):
        group = int(ids[counts == 1][0])
        raise ValueError(f"singleton: group {group} has one scored member and singleton='error'")


@torch.library.custom_op("fastrlhf::group_advantages", mutates_args=("out",))
def group_advantages_op(scores: Tensor, index: Tensor, mask: Optional[Tensor], estimator: str, scale: str,
                        eps: float, unbiased: bool, singleton: str, nan: str, out: Tensor) -> None:
    """Writes the advantages into ``out`` (arguments already checked by ``group_advantages``)."""
    _run(scores, index, mask, estimator, scale, eps, unbiased, singleton, nan, out)


@group_advantages_op.register_fake
def _(scores, index, mask, estimator, scale, eps, unbiased, singleton, nan, out):
    return None
