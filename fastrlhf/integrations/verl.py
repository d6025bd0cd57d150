"""``fastrlhf.integrations.verl.patch()``: verl's GAE, whitening, log-prob and entropy helpers, policy losses and
group advantage estimators on fastrlhf.

Replaced (each where fastrlhf computes the same thing; other inputs go to verl's own function):

- ``verl.trainer.ppo.core_algos.compute_gae_advantage_return`` (also in ``ADV_ESTIMATOR_REGISTRY["gae"]``):
  ``fastrlhf.gae(mask_mode="skip")``, which is verl's loop (masked tokens carry the next value and the
  advantage over them), then ``fastrlhf.masked_whiten``; returns are ``A + V`` before whitening, as in verl.
- ``verl.utils.torch_functional.masked_whiten``: ``fastrlhf.masked_whiten`` (mean, unbiased variance,
  ``rsqrt(var + 1e-8)``). The mask is read as 0/1, as verl's response masks are.
- ``verl.utils.torch_functional.logprobs_from_logits(logits, labels, inplace_backward=True)``:
  ``fastrlhf.logprobs``, fp32 log-probs (fp64 for fp64 logits), as verl's flash-attention path returns;
  ``inplace_backward`` is honoured as flash-attention does, except that fastrlhf moves the logits' version counter, so a
  later use of the overwritten logits raises instead of reading gradients.
- ``verl.utils.torch_functional.entropy_from_logits``: the entropy of ``fastrlhf.logprobs``, fp32 (fp64 for fp64).
- the policy losses ``vanilla``, ``gspo``, ``cispo``, ``sapo``, ``gpg`` (functions and ``POLICY_LOSS_REGISTRY``):
  ``fastrlhf.policy_loss``, see ``fastrlhf.integrations.verl_policy_loss``.
- the advantage estimators ``grpo``, ``grpo_vectorized``, ``rloo``, ``rloo_vectorized``,
  ``reinforce_plus_plus_baseline``, ``opo`` (functions and ``ADV_ESTIMATOR_REGISTRY``):
  ``fastrlhf.group_advantages``, see ``fastrlhf.integrations.verl_advantages``.

- ``core_algos.agg_loss``: one fused masked reduction on ``fastrlhf.policy_loss`` (the same counts and
  modes; masked entries never read), see ``verl_policy_loss.agg_loss``.

Not replaced: ``core_algos.kl_penalty``, an elementwise expression of two ``[B, T]`` tensors that returns
a ``[B, T]`` tensor (nothing for a kernel to fuse or save); where the KL enters a loss, ``policy_loss``'s
``ref_logp``/``kl_coef``/``kl_estimator`` computes verl's same estimators inside the fused pass.

``patch(match_dtype=True)`` returns the log-probs, entropies and policy losses in the dtype verl's own
function returns for the same call instead: the logits' dtype for ``entropy_from_logits`` on every device,
and for ``logprobs_from_logits`` unless verl's flash-attention cross-entropy path is on (fp32 there);
for the policy losses ``log_prob``'s dtype, or fp32 where verl's ``seq-*`` aggregations promote to it.

verl runs its workers in Ray processes: call ``patch()`` in each of them (before the workers build
their models, since some wrap ``entropy_from_logits`` in ``torch.compile`` then), not only in the driver.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

import fastrlhf
from fastrlhf.integrations import verl_advantages, verl_policy_loss
from fastrlhf.integrations._patch import Patched, require
from fastrlhf.integrations._shared import entropy, logits_dtype, matching_dtype

TESTED = ("0.9.",)
MODULES = ("verl.utils.torch_functional", "verl.trainer.ppo.core_algos")


def patch(match_dtype: bool = False) -> Patched:
    """Replaces verl's functions listed in this module's docstring; returns the handle that restores them.

    ``match_dtype``: log-probs, entropies and policy losses in the dtype verl's own function returns (see
    above) rather than fp32."""
    require("verl", MODULES, TESTED)
    return Patched("verl", replacements(match_dtype))


def replacements(match_dtype: bool = False):
    return {
        "verl.trainer.ppo.core_algos:compute_gae_advantage_return": compute_gae_advantage_return,
        "verl.utils.torch_functional:masked_whiten": masked_whiten,
        "verl.utils.torch_functional:logprobs_from_logits": matching_dtype(logprobs_from_logits, match_dtype,
                                                                           _logprobs_dtype),
        "verl.utils.torch_functional:entropy_from_logits": matching_dtype(entropy_from_logits, match_dtype,
                                                                          logits_dtype),
        **verl_policy_loss.replacements(match_dtype),
        **verl_advantages.replacements(),
    }


def _logprobs_dtype(logits, *args, **kwargs) -> torch.dtype:
    """What verl's ``logprobs_from_logits`` returns: fp32 from flash-attention's cross-entropy when verl
    uses it, else the logits' dtype (its log_softmax/logsumexp path)."""
    verl_F = sys.modules["verl.utils.torch_functional"]
    flash = verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    return torch.float32 if flash else logits.dtype


def compute_gae_advantage_return(original):
    @functools.wraps(original)
    def replacement(token_level_rewards, values, response_mask, gamma, lam):
        gamma, lam = _scalar(gamma), _scalar(lam)
        if (values.dtype != token_level_rewards.dtype or token_level_rewards.dim() != 2
                or not all(_coefficient_ok(c, token_level_rewards) for c in (gamma, lam))):
            return original(token_level_rewards, values, response_mask, gamma, lam)
        keep = response_mask if response_mask.dtype == torch.bool else response_mask != 0  # once, for both
        with torch.no_grad():
            advantages, returns = fastrlhf.gae(token_level_rewards, values, keep, gamma=gamma, lam=lam,
                                               mask_mode="skip")
            return fastrlhf.masked_whiten(advantages, keep), returns
    return replacement


def masked_whiten(original):
    @functools.wraps(original)
    def replacement(values, mask, shift_mean=True):
        if not values.is_floating_point() or mask.shape != values.shape:
            return original(values, mask, shift_mean)
        return fastrlhf.masked_whiten(values, mask, shift_mean=shift_mean)
    return replacement


def logprobs_from_logits(original):
    @functools.wraps(original)
    def replacement(logits, labels, inplace_backward=True):
        return fastrlhf.logprobs(logits, labels, inplace_backward=inplace_backward)
    return replacement


def entropy_from_logits(original):
    @functools.wraps(original)
    def replacement(logits):
        return entropy(logits)
    return replacement


def _scalar(coefficient):
    """verl passes floats, or sometimes one-element tensors."""
    if isinstance(coefficient, torch.Tensor) and coefficient.numel() == 1:
        return coefficient.item()
    return coefficient


def _coefficient_ok(coefficient, rewards) -> bool:
    """A float, or one value per row ([B] tensor), in [0, 1] as fastrlhf.gae requires."""
    if isinstance(coefficient, torch.Tensor):
        return coefficient.shape == rewards.shape[:1] and bool(((coefficient >= 0) & (coefficient <= 1)).all())
    return 0.0 <= float(coefficient) <= 1.0
