"""``fastrlhf.logprobs``: log-probabilities of labels and entropies, one pass over the logits.

The front end: checks the arguments, finds the sampler's kept set (``sampling_threshold``), and runs the
registered kernels of ``logprobs_local.py`` on this device's rows, or their vocab-parallel combination
(``logprobs_parallel.py``, eager) with ``process_group=``. Runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, reference
from fastrlhf.ops.logprobs_local import canonical, check_labels, with_kept
from fastrlhf.ops.logprobs_parallel import parallel_logprobs
from fastrlhf.ops.sampling_threshold import row_filters


def logprobs(logits: Tensor, labels: Tensor, *, temperature: float | Tensor = 1.0, ignore_index: int = -100,
             return_entropy: bool = False, inplace_backward: bool = False, process_group=None,
             vocab_start_index: Optional[int] = None, top_k=None, top_p=None, min_p=None, return_kept: bool = False):
    """Log-probability of each label under ``softmax(logits / temperature)``, and optionally the entropy.

    Args:
        logits: ``[..., V]`` fp32, bf16, fp16 or fp64. Read where they lie when the leading dims view as
            ``[N]`` or ``[B, T]`` with any strides (``logits[:, :-1, :]`` is not copied; an in-place backward
            writes into that view); copied only for a non-unit vocab stride or leading dims that cannot
            be viewed so.
        labels: ``[...]`` int64 or int32, the leading shape of ``logits``; each in ``[0, V)`` (the full
            vocabulary when sharded) or ``ignore_index``.
        temperature: a positive float, or a tensor broadcastable to ``[...]`` (per sequence or token).
            Not differentiated. A tensor's values are checked where ``checks.values_checked`` (CPU, or
            ``FASTRLHF_CHECKS=1``); elsewhere a row with temperature <= 0 (or NaN) gets NaN outputs.
        ignore_index: rows with this label give log-prob 0, entropy 0 and zero gradient.
        return_entropy: also return ``entropy = logsumexp(z) - sum softmax(z) * z``, ``z = logits / T``.
        inplace_backward: the backward writes the logits' gradient into ``logits``' own storage (no
            ``[..., V]`` allocation) and moves its version counter, so autograd raises if anything else
            still needs those logits.
        process_group: vocab-parallel: each rank holds ``logits[..., vocab_start_index:+V]`` of the full
            vocabulary; ``vocab_start_index`` defaults to ``rank * V``. One all-gather of three ``[...]``
            fp32 statistics combines the shards. Not combined with the filters below (raises).
        top_k, top_p, min_p: the sampler's filters (vLLM's processed log-probs; semantics, per-row tensors
            and tie rules in ``fastrlhf.ops.sampling_threshold``): the log-probs and entropy are those of
            the kept distribution, found per row by selection (``sampling_threshold``), never a sort. A
            label outside the kept set gets log-prob ``-inf`` and a zero gradient row (both outputs);
            gradients hold the kept set fixed.
        return_kept: also return ``[...]`` bool: could the sampler have drawn the label (its log-prob is
            above ``-inf``; True for ignored rows), after ``logp`` (and ``entropy``).

    Labels out of range raise ValueError where ``checks.values_checked``; otherwise (CUDA by default, and
    under torch.compile) the Triton kernel gives that row NaN log-prob, entropy and gradient, and the C++
    kernel raises RuntimeError. A NaN logit makes its row's log-prob, entropy and gradient NaN.

    Returns:
        ``logp`` (``[...]``, fp32; fp64 for fp64 logits), or ``(logp, entropy)``. ``logp`` is ``-inf`` where the label's logit
        is ``-inf``; ``-inf`` logits elsewhere are fine (zero probability). Accumulation is fp32 over
        vocab tiles (online max and sum; fp64 for fp64 logits), so a row's result does not depend on the
        other rows.
    """
    if backend.forced_backend() == "reference":
        if process_group is not None or inplace_backward:
            raise ValueError("the reference backend supports neither process_group nor inplace_backward")
        return reference.logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                  return_entropy=return_entropy, top_k=top_k, top_p=top_p, min_p=min_p,
                                  return_kept=return_kept)
    flat_logits, flat_labels, inv_temp = canonical(logits, labels, temperature)
    filters = row_filters(top_k, top_p, min_p, labels.shape, inv_temp)
    if process_group is not None and filters is not None:
        raise ValueError("top_k, top_p, min_p: not supported with process_group (the thresholds would need "
                         "every shard); apply them on gathered logits or leave them None")
    if process_group is not None:
        flat_logits = flat_logits.reshape(-1, flat_logits.shape[-1])  # the shard statistics take [N, V_r]
        logp, entropy = parallel_logprobs(flat_logits, flat_labels, inv_temp, ignore_index, process_group,
                                          vocab_start_index, inplace_backward)
    else:
        vocab = flat_logits.shape[-1]
        check_labels(flat_labels, ignore_index, vocab)
        threshold = None if filters is None else torch.ops.fastrlhf.sampling_threshold(
            flat_logits.detach(), inv_temp, *filters)
        logp, entropy, _ = torch.ops.fastrlhf.logprobs_forward(flat_logits, flat_labels, inv_temp, threshold,
                                                                ignore_index, 0, vocab, inplace_backward)
    return with_kept(logp.view(labels.shape), entropy.view(labels.shape), labels, ignore_index, return_entropy,
                     return_kept)
