"""Plain-torch reference of ``fastrlhf.policy_loss``, written term by term as trainers write it (verl's
``compute_policy_loss_*``, ``kl_penalty`` and ``agg_loss``), with the semantics of the fused op."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _masked_mean(x, mask):
    count = mask.sum()
    return torch.where(mask, x, 0).sum() / count.clamp(min=1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """verl's ``kl_penalty``: k1, abs, k2, k3 (clamped), a ``+`` suffix takes the gradient of k2."""
    base = estimator.removesuffix("+")
    if base == "k1":
        value = logp - ref_logp
    elif base == "abs":
        value = (logp - ref_logp).abs()
    elif base == "k2":
        value = 0.5 * (logp - ref_logp).square()
    else:
        kl = torch.clamp(ref_logp - logp, min=-20, max=20)
        value = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if estimator.endswith("+"):
        backward = 0.5 * (logp - ref_logp).square()
        return backward - backward.detach() + value.detach()
    return value


def _aggregate(loss_mat, mask, mode, num_tokens, num_sequences, horizon):
    """``agg_loss`` with the fused op's denominators (fully masked sequences excluded everywhere)."""
    loss_mat = torch.where(mask, loss_mat, 0)
    token_counts = mask.sum(-1).to(loss_mat.dtype)
    seq_valid = token_counts > 0
    if num_tokens is None:
        num_tokens = token_counts.sum()
    if num_sequences is None:
        num_sequences = seq_valid.sum()
    if mode == "token-mean":
        return loss_mat.sum() / num_tokens
    if mode == "token-sum":
        return loss_mat.sum()
    seq_losses = loss_mat.sum(-1)
    if mode == "seq-mean-token-mean":
        seq_losses = seq_losses / token_counts.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        seq_losses = seq_losses / horizon
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"aggregation: unknown mode {mode!r}")
    return torch.where(seq_valid, seq_losses, 0).sum() / num_sequences


def _padded(flat, cu_seqlens, fill=0.0):
    """Packed ``[N]`` to ``[S, max_len]`` (differentiable gather) and the validity of each slot."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    width = max(max(lengths), 1)
    index = torch.zeros(len(lengths), width, dtype=torch.long)
    inside = torch.zeros(len(lengths), width, dtype=torch.bool)
    for s, (a, n) in enumerate(zip(bounds, lengths)):
        index[s, :n] = torch.arange(a, a + n)
        inside[s, :n] = True
    return index.to(flat.device), inside.to(flat.device)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor] = None, *,
                loss_type: str = "ppo", clip_low: Optional[float] = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                rollout_is_weights: Optional[Tensor] = None, aggregation: str = "token-mean",
                kl_aggregation: Optional[str] = None, entropy_aggregation: Optional[str] = None,
                num_tokens=None, num_sequences=None, horizon=None, cu_seqlens: Optional[Tensor] = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Same signature and result as ``fastrlhf.policy_loss`` (see there)."""
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    mask = mask.bool() if mask.dtype != torch.bool else mask
    if cu_seqlens is not None:
        index, inside = _padded(logp, cu_seqlens)

        def pad(x):
            return None if x is None else x[index]
        if horizon is None:
            if "seq-mean-token-sum-norm" in (aggregation, kl_aggregation, entropy_aggregation):
                raise ValueError("horizon: required with cu_seqlens for aggregation 'seq-mean-token-sum-norm'")
            horizon = 1
        per_token_adv = advantages.shape == logp.shape
        return policy_loss(pad(logp), pad(old_logp), pad(advantages) if per_token_adv else advantages,
                           pad(mask) & inside, loss_type=loss_type, clip_low=clip_low, clip_high=clip_high,
                           dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                           ref_logp=pad(ref_logp), kl_coef=kl_coef, kl_estimator=kl_estimator, entropy=pad(entropy),
                           entropy_coef=entropy_coef, rollout_is_weights=pad(rollout_is_weights),
                           aggregation=aggregation, kl_aggregation=kl_aggregation,
                           entropy_aggregation=entropy_aggregation, num_tokens=num_tokens,
                           num_sequences=num_sequences, horizon=horizon)
    if horizon is None:
        horizon = logp.shape[-1]
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    # Masked tokens are replaced, not multiplied, so NaN or inf there never reaches a result.
    logp = torch.where(mask, logp.to(acc), 0)
    old_logp = torch.where(mask, old_logp.to(acc), 0)
    if advantages.dim() == 1 and advantages.shape != logp.shape:
        advantages = advantages[:, None].expand_as(logp)
    advantages = torch.where(mask, advantages.to(acc), 0)
    counts = dict(num_tokens=num_tokens, num_sequences=num_sequences, horizon=horizon)

    negative_approx_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    lower = -float("inf") if clip_low is None else 1 - clip_low
    upper = 1 + clip_high
    zero = torch.zeros((), dtype=acc, device=logp.device)
    clipfrac, dual_clipfrac = zero, zero
    if loss_type == "gspo":
        seq_lengths = mask.sum(-1).clamp(min=1)
        negative_approx_kl_seq = negative_approx_kl.sum(-1) / seq_lengths
        log_seq_ratio = logp - logp.detach() + negative_approx_kl_seq.detach()[:, None]
        ratio = torch.exp(torch.clamp(log_seq_ratio, max=10.0))
    if loss_type in ("ppo", "gspo"):
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, lower, upper)
        pg_losses = torch.maximum(pg_losses1, pg_losses2)
        clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses1).to(acc), mask)
        if dual_clip is not None:
            pg_losses3 = -advantages * dual_clip
            dual_clipfrac = _masked_mean((torch.gt(pg_losses, pg_losses3) & (advantages < 0)).to(acc), mask)
            pg_losses = torch.where(advantages < 0, torch.min(pg_losses3, pg_losses), pg_losses)
    elif loss_type == "cispo":
        clipped_ratio = torch.clamp(ratio, lower, upper)
        pg_losses = -clipped_ratio.detach() * advantages * logp
        clipfrac = _masked_mean((ratio != clipped_ratio).to(acc), mask)
    elif loss_type == "sapo":
        taus = torch.where(advantages > 0, torch.tensor(sapo_tau_pos, dtype=acc), torch.tensor(sapo_tau_neg, dtype=acc))
        pg_losses = -advantages * torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    elif loss_type == "reinforce":
        pg_losses = -advantages * logp
    else:
        raise ValueError(f"loss_type: unknown {loss_type!r}")
    if rollout_is_weights is not None:
        pg_losses = pg_losses * torch.where(mask, rollout_is_weights.to(acc), 0)
    policy = _aggregate(pg_losses, mask, aggregation, **counts)
    loss = policy

    kl = zero
    if ref_logp is not None and kl_coef != 0:
        ref = torch.where(mask, ref_logp.to(acc), 0)
        kl = _aggregate(kl_penalty(logp, ref, kl_estimator), mask, kl_aggregation or aggregation, **counts)
        loss = loss + kl_coef * kl
    ent = zero
    if entropy is not None and entropy_coef != 0:
        ent = _aggregate(torch.where(mask, entropy.to(acc), 0), mask, entropy_aggregation or aggregation, **counts)
        loss = loss - entropy_coef * ent

    clipped_side = loss_type in ("ppo", "gspo", "cispo")
    low = (ratio < lower) & (advantages < 0) if clipped_side else torch.zeros_like(mask)
    high = (ratio > upper) & (advantages > 0) if clipped_side else torch.zeros_like(mask)
    ratio = ratio.detach()
    any_token = mask.any()
    approx = torch.clamp(torch.exp(-negative_approx_kl) + negative_approx_kl - 1, min=-10, max=10)
    metrics = {
        "policy_loss": policy, "kl": kl, "entropy": ent, "clipfrac": clipfrac,
        "clipfrac_low": _masked_mean(low.to(acc), mask), "clipfrac_high": _masked_mean(high.to(acc), mask),
        "dual_clipfrac": dual_clipfrac, "ppo_kl": _masked_mean(-negative_approx_kl, mask),
        "approx_kl": _masked_mean(approx, mask), "ratio_mean": _masked_mean(ratio, mask),
        "ratio_min": torch.where(any_token, torch.where(mask, ratio, float("inf")).min(), 0),
        "ratio_max": torch.where(any_token, torch.where(mask, ratio, -float("inf")).max(), 0),
    }
    return loss, {k: v.detach().to(torch.float32) for k, v in metrics.items()}
