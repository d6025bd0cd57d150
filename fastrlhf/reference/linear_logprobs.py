"""Reference linear log-probs: the whole ``[tokens, V]`` logits tensor at once, then ``reference.logprobs``."""

from __future__ import annotations

import torch.nn.functional as F

from fastrlhf.reference.logprobs import logprobs


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                    chunk_size=None, top_k=None, top_p=None, min_p=None, return_kept=False):
    """``logprobs(hidden @ weight.T + bias, labels, ...)`` (the sampler's filters by the sort-based reference);
    ``chunk_size`` is accepted and ignored."""
    return logprobs(F.linear(hidden, weight, bias), labels, temperature=temperature, ignore_index=ignore_index,
                    return_entropy=return_entropy, top_k=top_k, top_p=top_p, min_p=min_p, return_kept=return_kept)
