"""``fastrlhf.sampling_threshold``: per-row thresholds of the sampler's min-p, top-k and top-p filters.

Semantics (vLLM's processed log-probs), on ``z = logits / temperature`` in the compute precision (fp32
for fp32, bf16 and fp16 logits, fp64 for fp64), in this order:

1. min-p keeps ``z >= max(z) + log(min_p)`` (probability at least ``min_p`` times the largest);
2. top-k keeps the values at least the k-th largest of what min-p kept (ties with it kept);
3. top-p, over the renormalised remainder sorted ascending, drops the tokens whose cumulative probability
   (including their own) is at most ``1 - top_p``; tie groups are kept or dropped whole (vLLM splits a
   tie at this boundary by its sort order), and the most likely tokens are always kept.

Each step keeps an upper set of the values, so the kept tokens of a row are exactly ``z >= threshold``
for one threshold per row: ``-inf`` where no filter is active (and for rows of only ``-inf`` logits),
NaN where a filtered row holds a NaN logit (so the log-probs of that row come out NaN) or where the
row's parameters are invalid and were not checked on the host. Found by selection, never by sorting the
row: ``csrc/sampling_threshold.cpp`` and ``fastrlhf/kernels/sampling_threshold.py`` describe how.

Registered as ``fastrlhf::sampling_threshold`` with a fake implementation (no gradient: the kept set is
held fixed by the log-prob ops), so it runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference
from fastrlhf.ops.logprobs_local import canonical

Param = Optional[float | int | Tensor]


def sampling_threshold(logits: Tensor, *, temperature: float | Tensor = 1.0, top_k: Param = None,
                       top_p: Param = None, min_p: Param = None) -> Tensor:
    """Per-row thresholds of ``z = logits / temperature``: the sampler keeps exactly ``z >= threshold``.

    Args:
        logits: ``[..., V]`` fp32, bf16, fp16 or fp64, unit stride in the last dim.
        temperature: as in ``fastrlhf.logprobs``.
        top_k: None, an int or an integer tensor broadcastable to ``[...]``; ``<= 0`` is off.
        top_p: None, a number or a floating tensor broadcastable to ``[...]``, at least 0; ``>= 1`` is off.
        min_p: None, a number or a floating tensor broadcastable to ``[...]``, in ``[0, 1]``; ``0`` is off.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 logits).
    """
    if backend.forced_backend() == "reference":
        return reference.sampling_threshold(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = logits.shape[:-1] if isinstance(logits, Tensor) else ()
    flat, _, inv_temp = canonical(logits, torch.empty(rows, dtype=torch.int64, device=logits.device), temperature)
    filters = row_filters(top_k, top_p, min_p, rows, inv_temp)
    if filters is None:
        return torch.full(rows, -torch.inf, dtype=inv_temp.dtype, device=logits.device)
    return torch.ops.fastrlhf.sampling_threshold(flat.detach(), inv_temp, *filters).view(rows)


def row_filters(top_k: Param, top_p: Param, min_p: Param, rows: torch.Size,
                inv_temp: Tensor) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Checks the filter arguments; ``(top_k int64, top_p, min_p)`` as contiguous ``[N]`` tensors (the
    dtype and device of ``inv_temp``, off where not given), or None when all three are None."""
    if top_k is None and top_p is None and min_p is None:
        return None
    n, like = inv_temp.shape[0], inv_temp
    k = _per_row("top_k", top_k, 0, rows, like.new_empty((), dtype=torch.int64), integer=True)
    p = _per_row("top_p", top_p, 1.0, rows, like, integer=False)
    mp = _per_row("min_p", min_p, 0.0, rows, like, integer=False)
    if checks.values_checked(p) and not bool((p >= 0).all()):
        raise ValueError(f"top_p: expected values >= 0, got {p[~(p >= 0)][0].item()}")
    if checks.values_checked(mp) and not bool(((mp >= 0) & (mp <= 1)).all()):
        raise ValueError(f"min_p: expected values in [0, 1], got {mp[~((mp >= 0) & (mp <= 1))][0].item()}")
    return k.reshape(n), p.reshape(n), mp.reshape(n)


def _per_row(name, value, off, rows, like, integer):
    if value is None:
        return torch.full(rows, off, dtype=like.dtype, device=like.device)
    if isinstance(value, Tensor):
        checks.device(name, value, like.device)
        if integer != (not value.is_floating_point() and value.dtype != torch.bool):
            raise TypeError(f"{name}: expected {'an integer' if integer else 'a floating'} tensor, got {value.dtype}")
        try:
            value = torch.broadcast_to(value.detach(), rows)
        except RuntimeError:
            raise ValueError(f"{name}: expected a shape broadcastable to {tuple(rows)}, "
                             f"got {tuple(value.shape)}") from None
        return value.to(like.dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TypeError(f"{name}: expected {'an int' if integer else 'a number'} or a tensor, got {value!r}")
    return torch.full(rows, value, dtype=like.dtype, device=like.device)


@torch.library.custom_op("fastrlhf::sampling_threshold", mutates_args=())
def sampling_threshold_op(logits: Tensor, inv_temp: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """``[N]`` thresholds of ``[N, V]`` logits for ``[N]`` 1/T, top-k (int64), top-p and min-p."""
    threshold = backend.empty_outputs(inv_temp, 1)[0]
    threshold_into(logits, inv_temp, top_k, top_p, min_p, threshold)
    return threshold


def threshold_into(logits: Tensor, inv_temp: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
                   out: Tensor) -> None:
    """Runs the kernel of ``logits``' device, writing the ``[N]`` thresholds into ``out`` (a contiguous
    ``[N]`` tensor in the accumulation dtype, e.g. a slice of a larger one)."""
    backend.kernels("sampling_threshold", logits).sampling_threshold(logits, inv_temp, top_k, top_p, min_p, out)


@sampling_threshold_op.register_fake
def _(logits, inv_temp, top_k, top_p, min_p):
    return torch.empty_like(inv_temp)
