"""Vocab-parallel ``fastrlhf.logprobs``: each rank of a process group holds a slice of the vocabulary.

Rank ``r`` holds ``z[:, s_r : s_r + V_r]`` (``z = logits / T``) of a vocabulary of ``V = sum_r V_r``. It
runs the local kernel on its shard, which gives per row the shard's logsumexp ``lse_r`` and the entropy
``H_r`` of the shard's own softmax, and reads the label's logit ``z_y`` if it owns the label. One
all-gather of these three ``[N]`` statistics (fp32; fp64 for fp64 logits) gives every rank all of them;
each rank then combines them in float64, identically, with ``w_r = exp(lse_r - lse)`` the probability
mass of shard ``r``:

    lse = logsumexp_r lse_r,      logp = z_y - lse,      H = sum_r w_r (H_r - log w_r).

(``H = lse - sum_j p_j z_j`` with ``p_j = w_r q_j`` on shard ``r``, ``q`` the shard's softmax, and
``sum_j q_j z_j = lse_r - H_r``; ``sum_r w_r = 1``.) An all-gather is exact and order-independent:
every rank computes the same result from the same numbers, where an all-reduce of maxima and then of
rescaled sums needs two collectives. The backward needs no collective: with the global ``lse`` and
``H`` the kernel's gradient ``(g_logp (onehot - p) - g_ent p (log p + H)) / T`` is local to each logit.

Runs eagerly (a ``torch.autograd.Function`` around the kernels and ``torch.distributed`` calls), not
under ``torch.compile``. Labels and temperatures must be the same on every rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastrlhf.ops.logprobs_local import check_labels, forward_local, logits_grad


def parallel_logprobs(flat_logits: Tensor, flat_labels: Tensor, inv_temp: Tensor, ignore_index: int, process_group,
                      vocab_start_index: Optional[int], inplace_backward: bool,
                      threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``[N]`` log-probs and entropies (fp32; fp64 for fp64 logits) over the full vocabulary, from this
    rank's ``[N, V_r]`` shard. ``threshold``: the kept set's per-row threshold (as in ``forward_local``),
    the same on every rank.

    ``vocab_start_index`` defaults to ``rank * V_r``. Raises ValueError (on every rank) unless the
    ranks' shards tile ``[0, V)`` exactly and hold the same number of rows, or if a label lies outside
    ``[0, V)`` and is not ``ignore_index``.
    """
    if torch.compiler.is_compiling():
        raise RuntimeError("logprobs(process_group=...) runs eagerly; call it outside torch.compile")
    vocab_start, vocab_size = _shard_layout(flat_logits, process_group, vocab_start_index)
    check_labels(flat_labels, ignore_index, vocab_size)
    return _ParallelLogprobs.apply(flat_logits, flat_labels, inv_temp, threshold, ignore_index, process_group,
                                   vocab_start, vocab_size, inplace_backward)


def _shard_layout(flat_logits: Tensor, group, vocab_start_index: Optional[int]) -> tuple[int, int]:
    """This rank's ``vocab_start`` and the full vocabulary size, checked across ranks (one small all-gather)."""
    rows, width = flat_logits.shape
    start = dist.get_rank(group) * width if vocab_start_index is None else int(vocab_start_index)
    mine = torch.tensor([start, width, rows], dtype=torch.int64, device=flat_logits.device)
    layout = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(layout, mine, group=group)
    layout = [tuple(t.tolist()) for t in layout]
    if len({r for _, _, r in layout}) != 1:
        raise ValueError(f"logits: expected the same number of rows on every rank, got {[r for _, _, r in layout]}")
    end = 0
    for s, v, _ in sorted(layout):
        if s != end:
            shards = [(s_, s_ + v_) for s_, v_, _ in layout]
            raise ValueError(f"vocab_start_index: expected the ranks' shards [start, start + V) to tile the "
                             f"vocabulary from 0 without gaps or overlaps, got {shards} (rank order)")
        end = s + v
    return start, end


def _all_gather_rows(stats: Tensor, group) -> Tensor:
    """``[world, N, k]``: every rank's ``[N, k]`` statistics."""
    out = stats.new_empty(dist.get_world_size(group), *stats.shape)
    dist.all_gather(list(out.unbind(0)), stats, group=group)
    return out


def _combine(lse_r: Tensor, entropy_r: Tensor, z_label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(logp, entropy, lse)`` ``[N]`` from ``[world, N]`` shard statistics (see the module doc),
    combined in float64 and returned in the statistics' dtype."""
    dtype = lse_r.dtype
    lse_r, entropy_r = lse_r.double(), entropy_r.double()
    lse = torch.logsumexp(lse_r, 0)
    log_w = lse_r - lse
    # A shard whose logits are all -inf has lse_r = -inf, weight 0 and contributes nothing (0 * inf = NaN).
    entropy = torch.where(lse_r > -torch.inf, log_w.exp() * (entropy_r - log_w), 0.0).sum(0)
    # A label logit of -inf is -inf, also where the whole row is -inf (lse = -inf).
    z_label = z_label.double().sum(0)
    logp = torch.where(z_label > -torch.inf, z_label - lse, -torch.inf)
    return logp.to(dtype), entropy.to(dtype), lse.to(dtype)


class _ParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_temp, threshold, ignore_index, group, vocab_start, vocab_size, inplace):
        width = logits.shape[1]
        _, entropy_r, lse_r = forward_local(logits, labels, inv_temp, threshold, ignore_index, vocab_start,
                                            vocab_size)
        # The owner's label logit as the kernel reads it (converted to 1/T's dtype, times 1/T); 0 elsewhere.
        local = labels - vocab_start
        owned = (local >= 0) & (local < width)
        picked = logits.gather(1, local.clamp(0, width - 1)[:, None])[:, 0].to(inv_temp.dtype) * inv_temp
        if threshold is not None:
            picked = picked.masked_fill(picked < threshold, -torch.inf)
        z_label = torch.where(owned, picked, 0.0)
        stats = _all_gather_rows(torch.stack([lse_r, entropy_r, z_label], 1), group)
        logp, entropy, lse = _combine(*stats.unbind(2))
        ignored = labels == ignore_index
        logp, entropy = logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)
        ctx.save_for_backward(logits, labels, inv_temp, threshold, logp, lse, entropy)
        ctx.args = (ignore_index, vocab_start, vocab_size, inplace)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, inv_temp, threshold, logp, lse, entropy = ctx.saved_tensors
        ignore_index, vocab_start, vocab_size, inplace = ctx.args
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad = logits_grad(logits, labels, inv_temp, threshold, logp, lse, entropy, grad_logp, grad_entropy,
                           ignore_index, vocab_start, vocab_size, inplace)
        return grad, None, None, None, None, None, None, None, None
