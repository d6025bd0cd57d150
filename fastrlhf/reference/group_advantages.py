"""Plain-torch ``group_advantages`` (vectorised, float64): same semantics as ``fastrlhf.group_advantages``.

Groups are compacted with ``torch.unique(return_inverse=True)`` (a host sync on CUDA, fine for a
reference) and reduced with ``index_add``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def group_advantages(scores: Tensor, index: Tensor, *, estimator: str = "grpo", mask: Optional[Tensor] = None,
                     scale: str = "group", eps: float = 1e-6, unbiased: bool = True, singleton: str = "raw",
                     nan: str = "propagate", out: Optional[Tensor] = None) -> Tensor:
    f64 = torch.float64
    if scores.dim() == 2:
        keep = mask if mask.dtype == torch.bool else mask != 0
        score = torch.where(keep, scores.to(f64), 0.0).sum(-1)
        length = keep.sum(-1).to(f64)
    else:
        score, length = scores.to(f64), torch.ones(scores.shape, dtype=f64, device=scores.device)
    rows = score.shape[0]
    groups, group = torch.unique(index, return_inverse=True)
    valid = ~score.isnan() if nan == "ignore" else torch.ones_like(score, dtype=torch.bool)

    def per_group(x):
        return torch.zeros(groups.numel(), dtype=f64, device=score.device).index_add_(0, group, x)

    n = per_group(valid.to(f64))[group]
    if singleton == "error" and bool(((n == 1) & valid).any()):
        raise ValueError("singleton: a group has one scored member and singleton='error'")
    # shift by the group's first valid member
    position = torch.where(valid, torch.arange(rows, device=score.device), rows)
    first = torch.full((groups.numel(),), rows, device=score.device).scatter_reduce_(0, group, position, "amin")
    shift = score[first.clamp(max=max(rows - 1, 0))][group]
    d = torch.where(valid, score - shift, 0.0)
    w = torch.where(valid, length if estimator == "opo" else torch.ones_like(score), 0.0)
    total = per_group(w)[group]
    base = torch.where(total == 0, 0.0, per_group(w * d)[group] / total)
    c = d - base
    spread = torch.ones_like(score)
    single_spread = torch.ones_like(score)
    if estimator == "rloo":
        c = c * n / (n - 1)
    elif estimator == "grpo" and scale == "group":
        spread = (per_group(torch.where(valid, c * c, 0.0))[group] / (n - int(unbiased))).sqrt() + eps
        single_spread = single_spread + eps
    elif estimator == "grpo" and scale == "batch":
        x = score[valid]
        std = ((x - x.mean()).square().sum() / (x.numel() - int(unbiased))).sqrt()
        spread = single_spread = std + eps
    adv = _divide(c, spread)
    single = {"raw": _divide(score, single_spread), "zero": score - score}.get(singleton, score)
    adv = torch.where(n == 1, single, adv)
    adv = torch.where(valid, adv, 0.0)
    if estimator == "reinforce++-baseline":
        weight = torch.where(valid & ((n > 1) | (singleton == "raw")), length, 0.0)
        included = weight > 0
        count = weight.sum()
        if count < 2:
            raise ValueError(f"mask: reinforce++-baseline whitens over at least 2 masked-in tokens, got {count}")
        mean = torch.where(included, weight * adv, 0.0).sum() / count
        var = torch.where(included, weight * (adv - mean).square(), 0.0).sum() / (count - 1)
        adv = torch.where(included, (adv - mean) * torch.rsqrt(var + 1e-8), adv)
    dtype = f64 if scores.dtype == f64 else torch.float32
    if scores.dim() == 2:
        adv = torch.where(keep, adv[:, None], 0.0)
    return adv.to(dtype) if out is None else out.copy_(adv)


def _divide(a, d):
    """a / d, with 0 where d is 0 (no spread and eps = 0); NaN stays NaN."""
    return torch.where(d == 0, torch.where(a.isnan(), a, 0.0), a / d)
