"""fastrlhf: fused, memory-lean kernels for RLHF, exposed as torch autograd ops."""

from fastrlhf.backend import BACKENDS, use_backend
from fastrlhf.ops.gae import gae
from fastrlhf.ops.group_advantages import group_advantages
from fastrlhf.ops.linear_logprobs import linear_logprobs
from fastrlhf.ops.linear_policy_loss import linear_policy_loss
from fastrlhf.ops.logprobs import logprobs
from fastrlhf.ops.pairwise import dpo_loss, pairwise_sigmoid_loss, reward_model_loss
from fastrlhf.ops.policy_loss import policy_loss
from fastrlhf.ops.rollout_correction import rollout_correction
from fastrlhf.ops.sampling_threshold import sampling_threshold
from fastrlhf.ops.whiten import masked_whiten

__all__ = ["BACKENDS", "dpo_loss", "gae", "group_advantages", "linear_logprobs", "linear_policy_loss", "logprobs",
           "masked_whiten", "pairwise_sigmoid_loss", "policy_loss", "reward_model_loss", "rollout_correction",
           "sampling_threshold", "use_backend"]
__version__ = "0.1.0"
