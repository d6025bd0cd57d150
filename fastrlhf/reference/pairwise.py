"""Reference pairwise losses: what trainers write today, in plain torch, computed in the inputs' dtype.

``pairwise_sigmoid_loss`` and ``dpo_loss`` follow TRL's ``DPOTrainer.dpo_loss`` formulas;
``reward_model_loss`` pools each row at its last unmasked token the way OpenRLHF does
(``T - 1 - mask.long().fliplr().argmax(1)``, then ``gather``), then takes the pairwise loss, the mean and
each metric as separate steps. Same signatures and semantics as the fused ops, differentiable through
torch autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(losses, reduction):
    return losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses


def _stats(chosen_rewards, rejected_rewards):
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    dtype = chosen_rewards.dtype
    ties = (chosen_rewards == rejected_rewards).to(dtype)
    return {"accuracy": ((chosen_rewards > rejected_rewards).to(dtype) + 0.5 * ties).mean(),
            "tie_rate": ties.mean(), "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(), "margin": (chosen_rewards - rejected_rewards).mean()}


def _sigmoid_losses(logits, beta, label_smoothing):
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def pairwise_sigmoid_loss(chosen, rejected, *, margin=None, beta=1.0, label_smoothing=0.0, reduction="mean"):
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    return _reduce(_sigmoid_losses(logits, beta, label_smoothing), reduction)


def reward_model_loss(chosen_values, rejected_values, *, chosen_mask, rejected_mask, margin=None, rank_coef=1.0,
                      center_coef=0.0, chosen_logprobs=None, lm_coef=0.0):
    def last_token_value(values, mask):
        eos = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
        return values.gather(dim=1, index=eos).squeeze(1)

    r_w, r_l = last_token_value(chosen_values, chosen_mask), last_token_value(rejected_values, rejected_mask)
    loss = rank_coef * pairwise_sigmoid_loss(r_w, r_l, margin=margin)
    if center_coef:
        loss = loss + center_coef * torch.mean((r_w + r_l) ** 2)
    if chosen_logprobs is not None:
        keep = chosen_mask.bool()
        loss = loss + lm_coef * -torch.where(keep, chosen_logprobs, 0).sum() / keep.sum()
    return loss, _stats(r_w, r_l)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, reduction="mean"):
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = _sigmoid_losses(logits, beta, label_smoothing)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of ('sigmoid', 'ipo', 'hinge', 'robust'), got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return _reduce(losses, reduction), _stats(chosen_rewards, rejected_rewards)
