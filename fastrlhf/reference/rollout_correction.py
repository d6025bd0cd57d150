"""``fastrlhf.rollout_correction`` in plain torch, term by term (the fused op is
``fastrlhf/ops/rollout_correction.py``): verl's ``rollout_corr_helper`` IS weights
(``compute_rollout_correction_weights``) and rejection masks (``compute_rollout_rejection_mask``) without its
host syncs: every metric stays on the device."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastrlhf import checks

SAFETY_BOUND = 20.0
IS_LEVELS = ("token", "sequence")
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
METRICS = ("is_weight_mean", "is_weight_min", "is_weight_max", "is_clipped_fraction", "rs_token_fraction",
           "rs_sequence_fraction")


def parse_rs(rs: str, rs_threshold) -> list[tuple[str, float | None, float]]:
    """verl's option names and threshold forms: ``[(option, lower_log or None, upper), ...]``.

    Options are comma separated (``token_k1``, ``seq_sum_k3``, ...); thresholds one shared or one per option
    (a number or a comma separated string). k1 options bound the ratio: ``"lo_hi"`` or ``hi`` (lo = 1/hi),
    compared in log space; k2/k3 options take one upper bound."""
    options = list(dict.fromkeys(o.strip() for o in rs.split(",") if o.strip()))
    if not options:
        raise ValueError(f"rs: expected comma separated options from {RS_OPTIONS}, got {rs!r}")
    for option in options:
        if option not in RS_OPTIONS:
            raise ValueError(f"rs: unknown option {option!r}, expected one of {RS_OPTIONS}")
    if rs_threshold is None:
        raise ValueError("rs_threshold: required with rs")
    specs = [s.strip() for s in rs_threshold.split(",") if s.strip()] if isinstance(rs_threshold, str) \
        else [str(float(rs_threshold))]
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rs_threshold: expected 1 or {len(options)} thresholds, got {rs_threshold!r}")
    specs = specs * len(options) if len(specs) == 1 else specs
    parsed = []
    for option, spec in zip(options, specs):
        try:
            if option.endswith("k1"):
                lower, upper = (float(x) for x in spec.split("_", 1)) if "_" in spec else (1 / float(spec), float(spec))
            elif "_" in spec:
                raise ValueError
            else:
                lower, upper = None, float(spec)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"rs_threshold: invalid threshold {spec!r} for option {option!r}") from None
        if not upper > 0 or (lower is not None and not lower > 0):
            raise ValueError(f"rs_threshold: thresholds must be positive, got {spec!r} for {option!r}")
        parsed.append((option, None if lower is None else math.log(lower), math.log(upper) if lower is not None
                       else upper))
    return parsed


def check_is(is_level, is_threshold) -> None:
    """``is_level`` one of ``IS_LEVELS`` or None; with a level, ``is_threshold`` a positive float or a pair
    ``(lo, hi)``, ``0 < lo <= hi``, both finite."""
    if is_level is None:
        return
    checks.one_of("is_level", is_level, IS_LEVELS)
    bounds = tuple(is_threshold) if isinstance(is_threshold, (tuple, list)) else (float(is_threshold),)
    if len(bounds) not in (1, 2) or not all(0 < float(b) < float("inf") for b in bounds) or (
            len(bounds) == 2 and not bounds[0] <= bounds[1]):
        raise ValueError(f"is_threshold: expected a positive float or a pair lo <= hi, got {is_threshold!r}")


def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, is_level=None, is_threshold=2.0,
                       rs=None, rs_threshold=None, cu_seqlens: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """IS weights and a rejection mask for the train/inference mismatch, once per batch before micro-batching.

    Args:
        old_logp, rollout_logp: ``[B, T]`` (or packed ``[N]`` with ``cu_seqlens``) log-probs of the sampled
            tokens under the training policy (before the update) and as the rollout engine reported them;
            one float dtype. Data (detached).
        mask: like ``old_logp``, bool or 0/1; masked tokens are never read into a result.
        cu_seqlens: int ``[S + 1]`` offsets of the packed sequences (0 to N), or None for ``[B, T]``.
        is_level: ``"token"`` (``log w = old_logp - rollout_logp``), ``"sequence"`` (summed over the
            sequence's unmasked tokens), clamped to +-20; None: weights of 1.
        is_threshold: a float truncates ``w`` at it (TIS); a pair ``(lo, hi)`` zeroes weights outside
            ``[lo, hi]`` (IcePop).
        rs, rs_threshold: verl's rejection options, comma separated (``token_k1`` ... ``seq_max_k3``, see
            ``RS_OPTIONS``), every one must pass; thresholds one shared or one per option: k1 options bound
            the ratio by ``"lo_hi"`` or ``hi`` (lo = 1 / hi) on ``-clamp(log w)`` in log space, k2 / k3 options
            take an upper bound on ``clamp(log w)^2 / 2`` / ``exp(log w) - 1 - log w`` (token value, or the
            sequence sum, mean or max over unmasked tokens).

    Returns ``(weights, mask, metrics)``: ``weights`` detached fp32 shaped like ``old_logp``, 0 outside the
    returned mask; ``mask`` the input mask without the rejected tokens (pass it, and counts taken from it, to
    ``policy_loss``); ``metrics`` 0-d fp32 device tensors: ``is_weight_mean`` / ``_min`` / ``_max`` (the
    weights before truncation, over the input mask's tokens), ``is_clipped_fraction`` (tokens truncated or
    zeroed), ``rs_token_fraction`` (tokens rejected), ``rs_sequence_fraction`` (sequences with a rejected
    token, over all sequences, as verl counts). No host sync.
    """
    checks.dtype("old_logp", old_logp, checks.FLOATS)
    if cu_seqlens is None:
        checks.ndim("old_logp", old_logp, (2,))
        rows, length = old_logp.shape
        seq = torch.arange(rows, device=old_logp.device).repeat_interleave(length)
    else:
        checks.ndim("old_logp (packed, with cu_seqlens)", old_logp, (1,))
        offsets = checks.offsets(cu_seqlens, old_logp)
        rows = offsets.numel() - 1
        seq = torch.searchsorted(offsets[1:], torch.arange(old_logp.numel(), device=old_logp.device), right=True)
    checks.dtype("rollout_logp", rollout_logp, (old_logp.dtype,))
    for name, t in (("rollout_logp", rollout_logp), ("mask", mask)):
        checks.tensor(name, t)
        checks.shape(name, t, old_logp.shape)
        checks.device(name, t, old_logp.device)
    check_is(is_level, is_threshold)
    rs_options = parse_rs(rs, rs_threshold) if rs is not None else []
    shape = old_logp.shape
    mask = (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)
    acc = torch.float64 if old_logp.dtype == torch.float64 else torch.float32
    log_ratio = torch.where(mask, old_logp.reshape(-1).to(acc) - rollout_logp.reshape(-1).to(acc), 0)
    tokens = mask.sum().clamp(min=1)
    counts = torch.zeros(rows, dtype=torch.int64, device=mask.device).index_add_(0, seq, mask.long())

    def seq_sum(x):
        return torch.zeros(rows, dtype=acc, device=x.device).index_add_(0, seq, x)

    if is_level == "token":
        weights = torch.exp(torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND))
    elif is_level == "sequence":
        weights = torch.exp(torch.clamp(seq_sum(log_ratio), -SAFETY_BOUND, SAFETY_BOUND))[seq]
    else:
        weights = torch.ones_like(log_ratio)
    weights = weights * mask
    raw = weights
    if is_level is not None and isinstance(is_threshold, (tuple, list)):
        outside = (weights < is_threshold[0]) | (weights > is_threshold[1])
        weights = torch.where(outside, 0.0, weights)
    elif is_level is not None:
        outside = weights > is_threshold
        weights = weights.clamp(max=is_threshold)
    else:
        outside = torch.zeros_like(mask)

    keep = torch.ones_like(mask)
    if rs_options:
        safe = torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
        stats = {"k1": -safe, "k2": 0.5 * safe ** 2, "k3": torch.exp(safe) - 1.0 - safe}
        for option, lower, upper in rs_options:
            token_stat = torch.where(mask, stats[option[-2:]], 0)
            if option.startswith("token"):
                stat = token_stat
            elif option.startswith("seq_sum"):
                stat = seq_sum(token_stat)[seq]
            elif option.startswith("seq_mean"):
                stat = (seq_sum(token_stat) / counts.clamp(min=1))[seq]
            else:
                masked = torch.full((rows,), -float("inf"), dtype=acc, device=mask.device).scatter_reduce_(
                    0, seq, torch.where(mask, token_stat, -float("inf")), "amax")
                stat = torch.where(counts > 0, masked, 0)[seq]
            ok = stat <= upper if lower is None else (stat >= lower) & (stat <= upper)
            keep = keep & ok
    final = mask & keep
    weights = torch.where(final, weights, 0).to(torch.float32)
    any_token = mask.any()
    rejected_sequences = torch.zeros(rows, dtype=torch.int64, device=mask.device).index_add_(
        0, seq, (mask & ~keep).long()) > 0
    stats = torch.stack([
        raw.sum() / tokens,
        torch.where(any_token, torch.where(mask, raw, float("inf")).min(), 0),
        torch.where(any_token, torch.where(mask, raw, -float("inf")).max(), 0),
        (outside & mask).sum() / tokens,
        (mask & ~keep).sum() / tokens,
        rejected_sequences.to(acc).mean(),
    ]).to(torch.float32)
    return weights.detach().view(shape), final.view(shape), {name: stats[k] for k, name in enumerate(METRICS)}
