"""Reference linear policy loss: ``reference.policy_loss`` on ``reference.linear_logprobs`` (the whole
``[tokens, V]`` logits at once, then the loss term by term)."""

from __future__ import annotations

from fastrlhf.reference.linear_logprobs import linear_logprobs
from fastrlhf.reference.policy_loss import policy_loss


def linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, temperature=1.0,
                       chunk_size=None, return_logp=False, **policy_loss_options):
    """``policy_loss(linear_logprobs(hidden, weight, labels, ...), old_logp, advantages, mask, entropy=...,
    **policy_loss_options)``, with the entropy from the same logits when ``entropy_coef != 0``;
    ``mask=None`` means every token whose label is not -100. ``return_logp=True`` adds the detached
    log-probs. ``chunk_size`` is accepted and ignored."""
    if mask is None:
        mask = labels != -100
    with_entropy = policy_loss_options.get("entropy_coef", 0.0) != 0
    logp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=with_entropy)
    logp, entropy = logp if with_entropy else (logp, None)
    loss, metrics = policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **policy_loss_options)
    return (loss, metrics, logp.detach()) if return_logp else (loss, metrics)
