"""Reference log-probs and entropy: what trainers write today, in plain torch.

``logprobs`` is ``log_softmax`` + ``gather`` with verl's ``entropy_from_logits``
(``logsumexp - sum(softmax * z)``) on ``z = logits / temperature``, upcast to fp32 (fp64 stays fp64);
``selective_logprobs`` is the row-looping form of TRL's ``selective_log_softmax``, which keeps one row's
``log_softmax`` alive at a time. Same signatures and semantics as ``fastrlhf.logprobs``, differentiable
through torch autograd.
"""

from __future__ import annotations

import torch

from fastrlhf.reference.sampling_threshold import kept_mask, scaled as _scaled


def _finish(logp, entropy, ignored, return_entropy):
    logp = logp.masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp
    return logp, entropy.masked_fill(ignored, 0.0)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, top_k=None, top_p=None,
             min_p=None, return_kept=False):
    """With ``top_k``/``top_p``/``min_p``: the distribution the sampler drew from (vLLM's processed
    log-probs, ``reference.sampling_threshold.kept_mask``, a full sort per row); a label outside the kept
    set gets log-prob ``-inf`` and no gradient through either output. ``return_kept`` appends whether the
    label could be drawn (log-prob above ``-inf``; True for ignored rows)."""
    z = _scaled(logits, temperature)
    ignored = labels == ignore_index
    index = labels.masked_fill(ignored, 0).long()[..., None]
    filtered = not (top_k is None and top_p is None and min_p is None)
    if filtered:
        z = z.masked_fill(~kept_mask(z.detach(), top_k=top_k, top_p=top_p, min_p=min_p), -torch.inf)
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, index)[..., 0]
    # verl's entropy_from_logits; softmax * z is 0 * -inf = NaN at -inf logits, so those read as 0 (before
    # the product, so that its gradient is 0 there too, not 0 * -inf).
    p = z.softmax(-1)
    entropy = torch.logsumexp(z, -1) - (p * z.masked_fill(p == 0, 0.0)).sum(-1)
    drawable = logp.detach() > -torch.inf
    if filtered:
        # The sampler could not have drawn the label: no gradient from this row at all.
        logp = torch.where(drawable, logp, logp.detach())
        entropy = torch.where(drawable, entropy, entropy.detach())
    outputs = _finish(logp, entropy, ignored, return_entropy)
    if not return_kept:
        return outputs
    kept = drawable | ignored
    return (*outputs, kept) if return_entropy else (outputs, kept)


def selective_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    rows = logits.reshape(-1, logits.shape[-1])
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.expand(logits.shape[:-1]).reshape(-1)
    else:
        temperature = torch.full((rows.shape[0],), float(temperature))
    flat = labels.reshape(-1)
    ignored = flat == ignore_index
    index = flat.masked_fill(ignored, 0).long()
    logp, entropy = [], []
    # One row upcast, scaled and normalised at a time; the picked values are copied out (a 0-d view
    # would keep its whole row alive until the end).
    for row, t, label in zip(rows, temperature, index):
        row_logp = _scaled(row, t).log_softmax(-1)
        logp.append(row_logp[label].clone())
        if return_entropy:
            entropy.append(-(row_logp.exp() * row_logp.masked_fill(row_logp == -torch.inf, 0.0)).sum())
    shape = labels.shape
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.stack(logp).reshape(shape) if logp else logits.new_zeros(shape, dtype=compute)
    entropy = (torch.stack(entropy).reshape(shape) if entropy else logits.new_zeros(shape, dtype=compute)) \
        if return_entropy else None
    return _finish(logp, entropy, ignored.reshape(shape), return_entropy)
