"""``fastrlhf.integrations.openrlhf.patch()``: OpenRLHF's log-prob, entropy, GAE and pairwise losses.

Replaced:

- ``openrlhf.models.utils.log_probs_from_logits(logits, labels, temperature=1.0)``:
  ``fastrlhf.logprobs``, fp32, fp64 for fp64 (the actor casts its logits to fp32 first, so this is
  OpenRLHF's dtype there). Like the original, a temperature other than 1 divides ``logits`` in place first: callers
  may rely on the scaled logits afterwards.
- ``openrlhf.models.utils.compute_entropy(logits)``: the entropy of ``fastrlhf.logprobs``, as above.
- ``RemoteExperienceMaker.get_advantages_and_returns`` (``openrlhf.trainer.ppo_utils.experience_maker``):
  ``fastrlhf.gae(mask_mode="zero")``, OpenRLHF's convention (masked rewards and values read as 0, every
  token a step, returns ``A + mask * V``). That module imports vLLM; without it this one is skipped,
  with a warning.
- ``PairWiseLoss.forward`` and ``LogExpLoss.forward`` (``openrlhf.models.loss``):
  ``fastrlhf.pairwise_sigmoid_loss`` (mean of ``-logsigmoid(c - r - margin)``; ``LogExpLoss``'s
  ``log(1 + exp(r - c))`` is the same softplus without a margin, which it ignores), finite for any gap
  where the original overflows above ~88. The loss is fp32 (fp64 for fp64 rewards).
- ``PolicyLoss.forward``: ``fastrlhf.policy_loss`` for ``policy_loss_type="ppo"``, with or without
  ``dual_clip``, token-level (``token-mean``, over ``batch_num_tokens / dp_size`` when given) or
  sequence-mean (``seq-mean-token-mean``, over ``global_batch_size / dp_size`` when given) aggregation. It
  returns what OpenRLHF's does, ``(loss, clip_ratio, ppo_kl, None, None)``, in OpenRLHF's dtypes (the
  arithmetic runs in the inputs' promoted dtype, as there); the old log-probs and advantages are data (no
  gradient reaches them). OpenRLHF's own forward runs for ``gspo``: its sequence ratio is differentiated
  through every token of the sequence, which equals fastrlhf's (verl's) token form only where the advantage
  is constant along the sequence, and OpenRLHF's advantages are per token. It also runs for
  ``is_correction_level != "off"`` (vLLM IS correction), unknown loss types (it raises), negative clip
  epsilons, a missing ``action_mask`` with sequence-mean aggregation, and inputs not all of one ``[B, T]``
  shape. Differences: ``ppo_kl`` averages the log-ratio clamped to +-20 (as the loss itself does there), and
  a batch without unmasked tokens gives 0 where OpenRLHF gives NaN. ``action_mask`` is read as 0/1.
- ``DPOLoss.forward``: ``fastrlhf.dpo_loss`` (``sigmoid`` with label smoothing, or ``ipo``, where
  OpenRLHF ignores the smoothing); the per-pair implicit rewards are returned as before.

``patch(match_dtype=True)`` returns the log-probs and entropies in the logits' dtype, as OpenRLHF's own
functions do (but for fp64 logits with flash-attn installed, where its log-probs are fp32).

``openrlhf.models`` imports flash-attn, DeepSpeed and PEFT, so ``patch()`` needs those installed.
"""

from __future__ import annotations

import functools
import warnings

import torch

import fastrlhf
from fastrlhf.integrations._patch import Patched, require
from fastrlhf.integrations._shared import entropy, logits_dtype, matching_dtype

TESTED = ("0.11.",)
MODULES = ("openrlhf.models.utils", "openrlhf.models.loss")
EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def patch(match_dtype: bool = False) -> Patched:
    """Replaces OpenRLHF's functions listed in this module's docstring; returns the handle that restores them.

    ``match_dtype``: log-probs and entropies in the logits' dtype (see above) rather than fp32."""
    require("openrlhf", MODULES, TESTED)
    targets = replacements(match_dtype)
    try:
        require("openrlhf", (EXPERIENCE,), TESTED)
    except ImportError as err:
        warnings.warn(f"OpenRLHF's GAE is not replaced: {err.__cause__}", stacklevel=2)
        targets = {k: v for k, v in targets.items() if not k.startswith(EXPERIENCE)}
    return Patched("openrlhf", targets)


def replacements(match_dtype: bool = False):
    return {
        "openrlhf.models.utils:log_probs_from_logits": matching_dtype(log_probs_from_logits, match_dtype,
                                                                      logits_dtype),
        "openrlhf.models.utils:compute_entropy": matching_dtype(compute_entropy, match_dtype, logits_dtype),
        f"{EXPERIENCE}:RemoteExperienceMaker.get_advantages_and_returns": get_advantages_and_returns,
        "openrlhf.models.loss:PairWiseLoss.forward": pairwise_loss_forward,
        "openrlhf.models.loss:LogExpLoss.forward": log_exp_loss_forward,
        "openrlhf.models.loss:DPOLoss.forward": dpo_loss_forward,
        "openrlhf.models.loss:PolicyLoss.forward": policy_loss_forward,
    }


def log_probs_from_logits(original):
    @functools.wraps(original)
    def replacement(logits, labels, temperature=1.0):
        if temperature != 1.0:
            logits.div_(temperature)
        return fastrlhf.logprobs(logits, labels)
    return replacement


def compute_entropy(original):
    @functools.wraps(original)
    def replacement(logits):
        return entropy(logits)
    return replacement


def get_advantages_and_returns(original):
    @functools.wraps(original)
    def replacement(self, values, rewards, action_mask, gamma, lambd):
        if (rewards.dim() != 2 or values.dtype != rewards.dtype or rewards.dtype not in FLOATS
                or not (0 <= gamma <= 1 and 0 <= lambd <= 1)):
            return original(self, values, rewards, action_mask, gamma, lambd)
        with torch.no_grad():
            return fastrlhf.gae(rewards, values, action_mask, gamma=gamma, lam=lambd, mask_mode="zero")
    return replacement


def pairwise_loss_forward(original):
    @functools.wraps(original)
    def replacement(self, chosen_reward, reject_reward, margin=None):
        return fastrlhf.pairwise_sigmoid_loss(chosen_reward, reject_reward, margin=margin)
    return replacement


def log_exp_loss_forward(original):
    @functools.wraps(original)
    def replacement(self, chosen_reward, reject_reward, margin=None):
        return fastrlhf.pairwise_sigmoid_loss(chosen_reward, reject_reward)
    return replacement


def dpo_loss_forward(original):
    @functools.wraps(original)
    def replacement(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps):
        loss_type, smoothing = ("ipo", 0.0) if self.ipo else ("sigmoid", self.label_smoothing)
        loss, _ = fastrlhf.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                    reference_rejected_logps, beta=self.beta, loss_type=loss_type,
                                    label_smoothing=smoothing)
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return loss, chosen_rewards, rejected_rewards
    return replacement


def policy_loss_forward(original):
    @functools.wraps(original)
    def replacement(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
        if not _policy_loss_covered(self, log_probs, old_log_probs, advantages, action_mask):
            return original(self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
                            batch_num_tokens, global_batch_size)
        token_level = self.token_level_loss
        options = dict(clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip,
                       aggregation="token-mean" if token_level else "seq-mean-token-mean")
        count = batch_num_tokens if token_level else global_batch_size
        if count is not None:
            options["num_tokens" if token_level else "num_sequences"] = count / dp_size
        # OpenRLHF's arithmetic runs in the promoted dtype of its inputs; a float mask promotes its results
        compute = functools.reduce(torch.promote_types, (log_probs.dtype, old_log_probs.dtype, advantages.dtype))

        def masked(dtype):
            floating_mask = action_mask is not None and action_mask.is_floating_point()
            return torch.promote_types(dtype, action_mask.dtype) if floating_mask else dtype

        loss, metrics = fastrlhf.policy_loss(log_probs.to(compute), old_log_probs.to(compute),
                                             advantages.to(compute), action_mask, **options)
        log_ratio = torch.promote_types(log_probs.dtype, old_log_probs.dtype)
        # its sequence mean divides by fp32 token counts
        result = masked(compute if token_level else torch.promote_types(compute, torch.float32))
        return (loss.to(result), metrics["clipfrac"].to(masked(torch.float32)),
                metrics["ppo_kl"].to(masked(log_ratio)), None, None)
    return replacement


def _policy_loss_covered(loss, log_probs, old_log_probs, advantages, action_mask) -> bool:
    """Whether ``PolicyLoss.forward`` runs on ``fastrlhf.policy_loss`` (see this module's docstring)."""
    if (loss.is_correction_level != "off" or loss.policy_loss_type != "ppo"
            or not (loss.clip_eps_low >= 0 and loss.clip_eps_high >= 0)
            or (action_mask is None and not loss.token_level_loss)):
        return False
    tensors = (log_probs, old_log_probs, advantages) + (() if action_mask is None else (action_mask,))
    return (log_probs.dim() == 2 and all(t.shape == log_probs.shape for t in tensors)
            and all(t.dtype in FLOATS for t in tensors[:3]))
