"""Plain-torch reference implementations, with the same signatures as the fused ops."""

from fastrlhf.reference.gae import gae, masked_whiten
from fastrlhf.reference.group_advantages import group_advantages
from fastrlhf.reference.linear_logprobs import linear_logprobs
from fastrlhf.reference.linear_policy_loss import linear_policy_loss
from fastrlhf.reference.logprobs import logprobs, selective_logprobs
from fastrlhf.reference.pairwise import dpo_loss, pairwise_sigmoid_loss, reward_model_loss
from fastrlhf.reference.policy_loss import policy_loss
from fastrlhf.reference.rollout_correction import rollout_correction
from fastrlhf.reference.sampling_threshold import sampling_threshold

__all__ = ["dpo_loss", "gae", "group_advantages", "linear_logprobs", "linear_policy_loss", "logprobs",
           "masked_whiten", "pairwise_sigmoid_loss", "policy_loss", "reward_model_loss", "rollout_correction",
           "sampling_threshold", "selective_logprobs"]
