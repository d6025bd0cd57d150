"""``fastrlhf.masked_whiten``: normalise advantages over the valid tokens, as verl and TRL do."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf import checks


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the elements where ``mask`` is set (unbiased variance).

    ``x``: float tensor of any shape; ``mask``: same shape, bool or 0/1. The statistics are those of verl's
    and TRL's ``masked_whiten`` (the same formula, so equal up to fp32 summation order), but masked
    elements are selected, not multiplied, so inf or NaN there does not reach them. The result is
    computed at every element, masked ones included; with ``shift_mean=False`` the mean is added back.
    """
    checks.dtype("x", x, checks.FLOATS)
    checks.tensor("mask", mask)
    checks.shape("mask", mask, x.shape)
    checks.device("mask", mask, x.device)
    keep = mask if mask.dtype == torch.bool else mask != 0
    count = keep.sum()
    mean = torch.where(keep, x, 0).sum() / count
    # verl's order of operations: the biased variance, then Bessel's correction
    var = torch.where(keep, (x - mean).square(), 0).sum() / count * (count / (count - 1))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean
