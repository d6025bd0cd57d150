"""Reference GAE: the reverse Python loop over time that trainers carry, in plain torch.

Same signature and semantics as ``fastrlhf.gae``; differentiable through torch autograd.
"""

from __future__ import annotations

import torch


def gae(rewards, values, mask=None, *, gamma=1.0, lam=1.0, dones=None, bootstrap_value=None,
        cu_seqlens=None, mask_mode="skip", returns_lam=None):
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [
            gae(rewards[None, s:e], values[None, s:e], None if mask is None else mask[None, s:e],
                gamma=_row(gamma, i), lam=_row(lam, i), dones=None if dones is None else dones[None, s:e],
                bootstrap_value=None if bootstrap_value is None else bootstrap_value[i:i + 1],
                mask_mode=mask_mode, returns_lam=_row(returns_lam, i))
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]
        return tuple(torch.cat([p[k][0] for p in pieces]) for k in (0, 1))

    compute = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r, v = rewards.to(compute), values.to(compute)
    B, T = r.shape
    keep = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    if mask_mode == "zero":  # OpenRLHF: rewards and values zeroed where masked, every step counts
        r, v = torch.where(keep, r, 0.0), torch.where(keep, v, 0.0)
        keep = torch.ones_like(keep)
    gamma, lam = _per_row(gamma, B, compute), _per_row(lam, B, compute)
    lam_r = lam if returns_lam is None else _per_row(returns_lam, B, compute)

    next_value = torch.zeros(B, dtype=compute) if bootstrap_value is None else bootstrap_value.to(compute)
    adv = adv_r = torch.zeros(B, dtype=compute)
    advantages, returns = [], []
    for t in reversed(range(T)):
        if dones is not None:  # the episode ends after t: nothing flows back from t + 1
            cut = dones[:, t].bool()
            next_value, adv, adv_r = (torch.where(cut, 0.0, x) for x in (next_value, adv, adv_r))
        delta = r[:, t] + gamma * next_value - v[:, t]
        m = keep[:, t]
        adv = torch.where(m, delta + gamma * lam * adv, adv)
        adv_r = torch.where(m, delta + gamma * lam_r * adv_r, adv_r)
        next_value = torch.where(m, v[:, t], next_value)
        advantages.append(adv)
        returns.append(adv_r + v[:, t])
    if T == 0:
        return rewards.clone(), rewards.clone()
    return tuple(torch.stack(xs[::-1], dim=1).to(rewards.dtype) for xs in (advantages, returns))


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """verl's ``masked_whiten``: (x - mean) / sqrt(var + eps) over the masked elements, unbiased var."""
    m = mask.to(x.dtype)
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum()
    var = var * m.sum() / (m.sum() - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def _per_row(x, rows, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.full((rows,), float(x), dtype=dtype)


def _row(x, i):
    return x[i:i + 1] if isinstance(x, torch.Tensor) else x
