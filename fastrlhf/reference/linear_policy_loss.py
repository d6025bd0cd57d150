"""Reference ``linear_policy_loss``: the whole ``[tokens, V]`` logits at once, then the plain-torch log-probs
and policy loss (what a trainer without fused kernels computes)."""

from __future__ import annotations

from fastrlhf.reference.linear_logprobs import linear_logprobs
from fastrlhf.reference.policy_loss import policy_loss


def linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, temperature=1.0,
                       ignore_index=-100, chunk_size=None, return_logp=False, top_k=None, top_p=None, min_p=None,
                       **options):
    """``policy_loss(linear_logprobs(hidden, weight, labels, ...), old_logp, advantages, mask, ...)``, the
    entropy term from the same logits; ``chunk_size`` is accepted and ignored. ``mask=None``: every token
    whose label is not ``ignore_index``; a given mask is also cleared there."""
    logp, entropy = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                    ignore_index=ignore_index, return_entropy=True, top_k=top_k, top_p=top_p,
                                    min_p=min_p)
    scored = labels != ignore_index
    mask = scored if mask is None else (mask != 0) & scored
    wants_entropy = options.get("entropy_coef", 0.0) != 0
    loss, metrics = policy_loss(logp, old_logp.to(logp.dtype), advantages.to(logp.dtype), mask,
                                entropy=entropy if wants_entropy else None, **_cast(options, logp.dtype))
    return (loss, metrics, logp.detach()) if return_logp else (loss, metrics)


def _cast(options, dtype):
    """Per-token tensors among the options (``ref_logp``, ``rollout_is_weights``) in the log-probs' dtype."""
    return {k: v.to(dtype) if k in ("ref_logp", "rollout_is_weights") and v is not None else v
            for k, v in options.items()}
