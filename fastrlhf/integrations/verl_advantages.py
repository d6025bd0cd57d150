"""verl's outcome advantage estimators on ``fastrlhf.group_advantages`` (part of
``fastrlhf.integrations.verl.patch()``).

Replaced, in ``verl.trainer.ppo.core_algos`` and in ``ADV_ESTIMATOR_REGISTRY`` (so ``get_adv_estimator_fn``
returns them), with verl's signatures (``token_level_rewards [B, T], response_mask [B, T], index, epsilon,
norm_adv_by_std_in_grpo, config``) and verl's ``(advantages, returns)``, the same tensor twice:

- ``grpo``, ``grpo_vectorized``: ``grpo`` with ``scale="group"`` (``"none"`` without
  ``norm_adv_by_std_in_grpo``); a group of one has mean 0 and std 1: ``s / (1 + epsilon)`` (``s``).
- ``rloo``: ``rloo``; a group of one keeps its score ``s``.
- ``rloo_vectorized``: ``rloo`` with ``singleton="zero"``; a group of one gets 0.
- ``reinforce_plus_plus_baseline``: ``grpo`` with ``scale="none"`` (a group of one keeps ``s``), then
  ``fastrlhf.masked_whiten`` over the response tokens.
- ``opo``: ``opo`` (the group's mean score weighted by length); a group of one keeps ``s``.

As in verl, a response's score is the sum of its rewards over every token (``token_level_rewards.sum(-1)``)
and the advantage is broadcast over the response (``* response_mask``); the mask is read as 0/1 (OPO's
lengths are its token counts). Groups are verl's: for the loop estimators (``grpo``, ``rloo``,
``reinforce_plus_plus_baseline``, ``opo``) equal ``index`` values (uid strings or numbers, mapped to integer
ids on the host with ``numpy.unique``), for ``grpo_vectorized`` verl's ``as_torch_index``, for
``rloo_vectorized`` ``numpy.unique``. Statistics are fastrlhf's (two-pass, float64): a group of equal scores
gives exactly 0, where verl's fp32 loop can leave rounding noise divided by ``epsilon``.

verl's own function runs instead where the op does not cover the call: rewards that are not fp32/fp64
``[B, T]`` (bf16 rewards keep verl's dtype rules), a mask of another shape or a floating-point mask, an
``index`` that is a torch tensor for the loop estimators (verl's loop keys a dict by tensor identity, so every
row is its own group), that ``numpy.unique`` cannot order (mixed types), with NaN, or of the wrong length,
and (GRPO) an ``epsilon`` that is not a finite number >= 0.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch

import fastrlhf
from fastrlhf.integrations._shared import by_name
from fastrlhf.integrations.verl_policy_loss import finite_number

CORE_ALGOS = "verl.trainer.ppo.core_algos"

# verl estimator -> (group_advantages estimator, singleton, how verl groups the index)
ESTIMATORS = {
    "compute_grpo_outcome_advantage": ("grpo", "raw", "equality"),
    "compute_grpo_vectorized_outcome_advantage": ("grpo", "raw", "as_torch_index"),
    "compute_rloo_outcome_advantage": ("rloo", "raw", "equality"),
    "compute_rloo_vectorized_outcome_advantage": ("rloo", "zero", "numpy_unique"),
    "compute_reinforce_plus_plus_baseline_outcome_advantage": ("reinforce++-baseline", "raw", "equality"),
    "compute_opo_outcome_advantage": ("opo", "raw", "equality"),
}


def replacements() -> dict:
    return {f"{CORE_ALGOS}:{name}": functools.partial(_replacement, estimator=estimator, singleton=singleton,
                                                      grouping=grouping)
            for name, (estimator, singleton, grouping) in ESTIMATORS.items()}


def _replacement(original, *, estimator, singleton, grouping):
    def run(a):
        rewards, mask, epsilon = a["token_level_rewards"], a["response_mask"], a["epsilon"]
        ids = _group_ids(a["index"], grouping, rewards) if _tensors_covered(rewards, mask) else None
        if ids is None or (estimator == "grpo" and not (finite_number(epsilon) and epsilon >= 0)):
            return None
        options = {"estimator": estimator, "singleton": singleton}
        if estimator == "grpo":
            options.update(scale="group" if a["norm_adv_by_std_in_grpo"] else "none", eps=float(epsilon))
        with torch.no_grad():
            advantages = _advantages(rewards, mask, ids, options)
        return advantages, advantages
    return by_name(original, run)


def _advantages(rewards, mask, ids, options):
    scores = rewards.sum(dim=-1)  # verl's score: every token's reward, masked or not
    if options["estimator"] == "opo":
        keep = mask if mask.dtype == torch.bool else mask != 0
        return fastrlhf.group_advantages(_at_first_kept_token(scores, keep), ids, mask=keep, **options)
    if options["estimator"] == "reinforce++-baseline":
        centred = fastrlhf.group_advantages(scores, ids, estimator="grpo", scale="none")
        return fastrlhf.masked_whiten(centred[:, None] * mask, mask) * mask
    return fastrlhf.group_advantages(scores, ids, **options)[:, None] * mask


def _at_first_kept_token(scores, keep):
    """``[B, T]`` zeros with each row's score at its first kept token: OPO needs the token path for the
    lengths, and this makes its masked sum verl's sum over every token. A row with no kept token scores
    nothing and weighs nothing, as in verl."""
    first = keep.to(torch.uint8).argmax(dim=-1, keepdim=True)
    return torch.zeros(keep.shape, dtype=scores.dtype, device=scores.device).scatter_(1, first, scores[:, None])


def _tensors_covered(rewards, mask) -> bool:
    return (isinstance(rewards, torch.Tensor) and rewards.dim() == 2 and rewards.shape[0] > 0
            and rewards.dtype in (torch.float32, torch.float64) and isinstance(mask, torch.Tensor)
            and mask.shape == rewards.shape and mask.device == rewards.device
            and not (mask.is_floating_point() or mask.is_complex()))


def _group_ids(index, grouping, rewards):
    """int64 ``[B]`` group ids (0..G-1) on the rewards' device that group the rows as verl's function does,
    or None where that cannot be reproduced."""
    try:
        if grouping == "as_torch_index":
            labels = sys.modules[CORE_ALGOS].as_torch_index(index, device="cpu").numpy()
        elif grouping == "numpy_unique":
            labels = index
        else:  # a dict keyed by index[i]: numpy's equality, except for tensors (identity) and NaN (never equal)
            if isinstance(index, torch.Tensor):
                return None
            labels = np.asarray(index)
            if labels.dtype.kind in "fc" and np.isnan(labels).any():
                return None
        inverse = np.unique(labels, return_inverse=True)[1].reshape(-1)
    except (TypeError, ValueError):
        return None
    if inverse.shape[0] != rewards.shape[0]:
        return None
    return torch.from_numpy(inverse.astype(np.int64, copy=False)).to(rewards.device)
