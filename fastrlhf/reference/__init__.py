"""Plain-torch reference implementations, with the same signatures as the fused ops."""

from fastrlhf.reference.gae import gae, masked_whiten
from fastrlhf.reference.linear_logprobs import linear_logprobs
from fastrlhf.reference.logprobs import logprobs, selective_logprobs
from fastrlhf.reference.pairwise import dpo_loss, pairwise_sigmoid_loss, reward_model_loss
from fastrlhf.reference.sampling_threshold import sampling_threshold

__all__ = ["dpo_loss", "gae", "linear_logprobs", "logprobs", "masked_whiten", "pairwise_sigmoid_loss",
           "reward_model_loss", "sampling_threshold", "selective_logprobs"]
