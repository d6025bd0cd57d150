"""``fastrlhf.rollout_correction``: IS weights and a rejection mask for the train/inference mismatch, one fused
op computed once per batch before micro-batching.

One kernel task per sequence (C++: ``at::parallel_for`` over sequences; Triton: one program per sequence).
Where a sequence-level quantity is needed (``is_level="sequence"`` or a ``seq_*`` rejection option) the task
first sums the sequence's log-ratio and k1/k2/k3 statistics, then one pass over its tokens writes each
token's weight and kept flag and the sequence's partial sums of the metrics; a finish step combines the
partial sums in sequence order. Without sequence-level options it is one pass over the tokens. No host
sync; the outputs are detached data, so the op has no backward.

Registered as ``fastrlhf::rollout_correction_forward`` with a fake implementation, so it runs under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference
from fastrlhf.ops.policy_loss import sequence_offsets
from fastrlhf.reference.rollout_correction import IS_LEVELS, METRICS, check_is, parse_rs

# Codes shared with csrc/rollout_correction.cpp and fastrlhf/kernels/rollout_correction.py.
RS_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
RS_KINDS = ("k1", "k2", "k3")
PARTIALS = ("tokens", "weight_sum", "weight_min", "weight_max", "clipped", "rejected", "rejected_sequence")


class Options(NamedTuple):
    """The scalar options as the kernels take them."""

    is_level: int          # 0: none, 1 + IS_LEVELS.index(is_level)
    is_window: bool        # IcePop: zero weights outside [is_lo, is_hi]; else truncate at is_hi (TIS)
    is_lo: float
    is_hi: float
    rs_flags: int          # bit 3 * RS_LEVELS.index(level) + RS_KINDS.index(kind): the option is on
    rs_bounds: list[float]  # per level: k1's lower and upper bound (log space), k2's and k3's upper bound


def make_options(is_level, is_threshold, rs, rs_threshold) -> Options:
    """Checks the options (as the reference does); returns them in the kernels' form."""
    check_is(is_level, is_threshold)
    window = is_level is not None and isinstance(is_threshold, (tuple, list))
    lo, hi = (float(is_threshold[0]), float(is_threshold[1])) if window else (0.0, float(is_threshold))
    flags, bounds = 0, [math.nan] * (4 * len(RS_LEVELS))
    for option, lower, upper in (parse_rs(rs, rs_threshold) if rs is not None else []):
        level, kind = option.rsplit("_", 1)
        slot = 3 * RS_LEVELS.index(level) + RS_KINDS.index(kind)
        flags |= 1 << slot
        base = 4 * RS_LEVELS.index(level)
        if kind == "k1":
            bounds[base], bounds[base + 1] = lower, upper
        else:
            bounds[base + RS_KINDS.index(kind) + 1] = upper
    return Options(0 if is_level is None else 1 + IS_LEVELS.index(is_level), window, lo, hi, flags, bounds)


def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, is_level: Optional[str] = None,
                       is_threshold=2.0, rs: Optional[str] = None, rs_threshold=None,
                       cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """IS weights and a rejection mask for the train/inference mismatch, once per batch before micro-batching.

    Args:
        old_logp, rollout_logp: ``[B, T]`` (or packed ``[N]`` with ``cu_seqlens``) log-probs of the sampled
            tokens under the training policy (before the update) and as the rollout engine reported them;
            one float dtype (fp32, bf16, fp16, fp64). Data (detached).
        mask: like ``old_logp``, bool or 0/1; masked tokens are never read into a result (NaN or inf there
            changes nothing).
        cu_seqlens: int ``[S + 1]`` offsets of the packed sequences (0 to N), or None for ``[B, T]``.
        is_level: ``"token"`` (``log w = old_logp - rollout_logp``), ``"sequence"`` (summed over the
            sequence's unmasked tokens), clamped to +-20; None: weights of 1.
        is_threshold: a float truncates ``w`` at it (TIS); a pair ``(lo, hi)`` zeroes weights outside
            ``[lo, hi]`` (IcePop).
        rs, rs_threshold: verl's rejection options, comma separated (``token_k1`` ... ``seq_max_k3``,
            ``fastrlhf.reference.rollout_correction.RS_OPTIONS``), every one must pass; thresholds one shared
            or one per option: k1 options bound the ratio by ``"lo_hi"`` or ``hi`` (lo = 1 / hi) on
            ``-clamp(log w)`` in log space, k2 / k3 options take an upper bound on ``clamp(log w)^2 / 2`` /
            ``exp(log w) - 1 - log w`` (token value, or the sequence sum, mean or max over unmasked tokens).

    Returns ``(weights, mask, metrics)``: ``weights`` detached fp32 shaped like ``old_logp``, 0 outside the
    returned mask; ``mask`` bool, the input mask without the rejected tokens (pass it, and counts taken from
    it, to ``policy_loss``); ``metrics`` 0-d fp32 views of one device tensor: ``is_weight_mean`` / ``_min`` /
    ``_max`` (the weights before truncation, over the input mask's tokens; 0 without tokens),
    ``is_clipped_fraction`` (tokens truncated or zeroed), ``rs_token_fraction`` (tokens rejected),
    ``rs_sequence_fraction`` (sequences with a rejected token, over all sequences, as verl counts).
    Arithmetic is fp32 (fp64 for fp64; thresholds arrive in fp32 on Triton). A NaN at an unmasked token
    makes its weight NaN unless a rejection option rejects it, and shows in the metrics. No host sync.
    """
    if backend.forced_backend() == "reference":
        return reference.rollout_correction(old_logp, rollout_logp, mask, is_level=is_level,
                                            is_threshold=is_threshold, rs=rs, rs_threshold=rs_threshold,
                                            cu_seqlens=cu_seqlens)
    offsets = sequence_offsets("old_logp", old_logp, cu_seqlens)
    checks.dtype("rollout_logp", rollout_logp, (old_logp.dtype,))
    for name, t in (("rollout_logp", rollout_logp), ("mask", mask)):
        checks.tensor(name, t)
        checks.shape(name, t, old_logp.shape)
        checks.device(name, t, old_logp.device)
    if mask.is_complex():
        raise TypeError(f"mask: expected bool or 0/1 numbers, got {mask.dtype}")
    options = make_options(is_level, is_threshold, rs, rs_threshold)
    flat_mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(-1)
    weights, kept, metrics = torch.ops.fastrlhf.rollout_correction_forward(
        old_logp.detach().contiguous().view(-1), rollout_logp.detach().contiguous().view(-1), flat_mask, offsets,
        *options)
    return (weights.view(old_logp.shape), kept.view(old_logp.shape),
            {name: metrics[k] for k, name in enumerate(METRICS)})


@torch.library.custom_op("fastrlhf::rollout_correction_forward", mutates_args=())
def rollout_correction_forward(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, offsets: Tensor,
                               is_level: int, is_window: bool, is_lo: float, is_hi: float, rs_flags: int,
                               rs_bounds: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Flat ``[N]`` inputs (bool mask), int64 offsets ``[S + 1]`` and ``Options``; returns the fp32 weights
    ``[N]``, the kept mask ``[N]`` and the ``[len(METRICS)]`` fp32 metrics."""
    weights = backend.empty_outputs(old_logp.new_empty(old_logp.shape, dtype=torch.float32), 1)[0]
    kept = backend.empty_outputs(mask, 1)[0]
    metrics = backend.empty_outputs(old_logp.new_empty(len(METRICS), dtype=torch.float32), 1)[0]
    backend.kernels("rollout_correction", old_logp).rollout_correction(
        old_logp, rollout_logp, mask, offsets, is_level, is_window, is_lo, is_hi, rs_flags, rs_bounds, weights,
        kept, metrics)
    return weights, kept, metrics


@rollout_correction_forward.register_fake
def _(old_logp, rollout_logp, mask, offsets, *options):
    return (old_logp.new_empty(old_logp.shape, dtype=torch.float32), torch.empty_like(mask),
            old_logp.new_empty(len(METRICS), dtype=torch.float32))
