"""Reference sampler filters: vLLM's min-p, then top-k, then top-p, with a full sort of each row.

This is how vLLM's sampler (``apply_top_k_top_p_pytorch`` after its min-p logits processor) and NeMo-RL
apply the filters, with one change: ties at the top-p boundary are kept whole (vLLM splits them by its
sort order). Everything runs in ``z``'s dtype; tests pass float64.
"""

from __future__ import annotations

import torch


def per_row(value, shape, dtype, device):
    """A Python number, None or a tensor broadcast to the rows ``shape`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return torch.broadcast_to(value.to(device=device, dtype=dtype), shape)
    return torch.full(shape, value, dtype=dtype, device=device)


def kept_mask(z, *, top_k=None, top_p=None, min_p=None):
    """``[..., V]`` bool: the tokens of ``z = logits / temperature`` that the sampler may draw.

    ``top_k``, ``top_p``, ``min_p``: None, a number or a tensor broadcastable to ``z.shape[:-1]``;
    ``top_k <= 0``, ``top_p >= 1`` and ``min_p <= 0`` switch a filter off for a row.
    """
    rows, V = z.shape[:-1], z.shape[-1]
    removed = torch.zeros_like(z, dtype=torch.bool)
    min_p = per_row(min_p, rows, z.dtype, z.device)
    if min_p is not None:
        # vLLM's MinPLogitsProcessor: drop probabilities below min_p times the largest.
        probs = z.softmax(-1)
        removed |= probs < min_p.clamp(min=0)[..., None] * probs.amax(-1, keepdim=True)
    ascending, order = z.masked_fill(removed, -torch.inf).sort(-1)
    removed = removed.gather(-1, order)
    top_k = per_row(top_k, rows, torch.int64, z.device)
    if top_k is not None:
        # The k-th largest remaining value; ties with it are kept. k <= 0 or k >= V keeps everything.
        k = torch.where(top_k <= 0, V, top_k.clamp(max=V))
        removed |= ascending < ascending.gather(-1, (V - k)[..., None])
        ascending = ascending.masked_fill(removed, -torch.inf)
    top_p = per_row(top_p, rows, z.dtype, z.device)
    if top_p is not None:
        cumulative = ascending.softmax(-1).cumsum(-1)
        # A tie group is dropped as a whole when the mass up to and including its last member is at
        # most 1 - p; the largest value's group is always kept.
        group_end = torch.searchsorted(ascending, ascending, right=True) - 1
        dropped = cumulative.gather(-1, group_end) <= (1 - top_p)[..., None]
        removed |= dropped & (top_p < 1)[..., None] & (ascending < ascending[..., -1:])
    # A row of only -inf logits has no distribution: nothing is removed from it.
    removed &= (ascending[..., -1:] > -torch.inf)
    return torch.empty_like(removed).scatter_(-1, order, ~removed)


def sampling_threshold(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """``[...]`` per-row thresholds: the smallest kept ``z`` (``-inf`` when nothing is filtered), so that
    the kept set is ``z >= threshold``. Same arguments as ``fastrlhf.sampling_threshold``."""
    z = scaled(logits, temperature)
    kept = kept_mask(z, top_k=top_k, top_p=top_p, min_p=min_p)
    threshold = z.masked_fill(~kept, torch.inf).amin(-1)
    return threshold.masked_fill(kept.all(-1), -torch.inf)


def scaled(logits, temperature):
    """``logits / temperature`` in the compute dtype (fp64 for fp64 logits, else fp32)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute)
    if isinstance(temperature, torch.Tensor):
        return z / temperature.to(compute).expand(logits.shape[:-1])[..., None]
    return z / temperature
