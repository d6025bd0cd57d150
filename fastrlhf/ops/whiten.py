"""``fastrlhf.masked_whiten``: normalise advantages over the valid tokens, as verl and TRL do.

CPU tensors run the C++ kernel (custom ops ``fastrlhf::masked_whiten_forward`` / ``_backward``, with fake
implementations and autograd); other devices run the same formula in torch, whose few reductions are
already memory-bound there, so whitening has no Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the elements where ``mask`` is set (unbiased variance).

    ``x``: float tensor of any shape; ``mask``: same shape, bool or 0/1, with at least 2 elements set.
    The statistics are those of verl's and TRL's ``masked_whiten`` (the same formula: mean, biased
    variance times n / (n - 1)), accumulated in float64 on the CPU path. Masked elements are selected,
    not multiplied, so inf or NaN there does not reach the statistics. The result is computed at every
    element, masked ones included; with ``shift_mean=False`` the mean is added back. Differentiable.

    Fewer than 2 elements set raises ValueError where ``fastrlhf.checks.values_checked`` allows a host
    read (CPU, or CUDA with ``FASTRLHF_CHECKS=1``); the default CUDA path never syncs with the host and
    returns what the formula gives there: NaN everywhere (0 / 0 for the mean or the variance).
    """
    checks.dtype("x", x, checks.FLOATS)
    checks.tensor("mask", mask)
    checks.shape("mask", mask, x.shape)
    checks.device("mask", mask, x.device)
    keep = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    if backend.forced_backend() == "reference" or x.device.type != "cpu":
        if checks.values_checked(keep) and int(keep.sum()) < 2:
            raise ValueError(f"mask: expected at least 2 elements set, got {int(keep.sum())}")
        if x.device.type != "cpu":
            return _torch_formula(x, keep, shift_mean, eps)
        return reference.masked_whiten(x, keep, shift_mean=shift_mean, eps=eps)
    x = x.contiguous()
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.fastrlhf.masked_whiten_forward(x, keep, shift_mean, eps)[0]
    return _forward(x, keep, shift_mean, eps)[0]  # eager, no gradient: skip the op's dispatch cost


def _torch_formula(x, keep, shift_mean, eps):
    count = keep.sum()
    mean = torch.where(keep, x, 0).sum() / count
    # verl's order of operations: the biased variance, then Bessel's correction
    var = torch.where(keep, (x - mean).square(), 0).sum() / count * (count / (count - 1))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def _forward(x, mask, shift_mean, eps):
    out = backend.empty_outputs(x, 1)[0]
    stats = backend.cpp_ops().masked_whiten_forward(x, mask, shift_mean, eps, out)
    return out, stats


@torch.library.custom_op("fastrlhf::masked_whiten_forward", mutates_args=())
def masked_whiten_forward(x: Tensor, mask: Tensor, shift_mean: bool, eps: float) -> tuple[Tensor, Tensor]:
    """The whitened ``x`` and float64 ``[mean, rstd]`` (for the backward)."""
    return _forward(x, mask, shift_mean, eps)


@masked_whiten_forward.register_fake
def _(x, mask, shift_mean, eps):
    return torch.empty_like(x), x.new_empty(2, dtype=torch.float64)


@torch.library.custom_op("fastrlhf::masked_whiten_backward", mutates_args=())
def masked_whiten_backward(grad: Tensor, x: Tensor, mask: Tensor, stats: Tensor, shift_mean: bool) -> Tensor:
    grad_x = backend.empty_outputs(x, 1)[0]
    backend.cpp_ops().masked_whiten_backward(grad, x, mask, stats, shift_mean, grad_x)
    return grad_x


@masked_whiten_backward.register_fake
def _(grad, x, mask, stats, shift_mean):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, mask, shift_mean, _ = inputs
    ctx.save_for_backward(x, mask, output[1])
    ctx.shift_mean = shift_mean


def _backward(ctx, grad, _grad_stats):
    x, mask, stats = ctx.saved_tensors
    return torch.ops.fastrlhf.masked_whiten_backward(grad.contiguous(), x, mask, stats, ctx.shift_mean), None, None, None


masked_whiten_forward.register_autograd(_backward, setup_context=_setup_context)
