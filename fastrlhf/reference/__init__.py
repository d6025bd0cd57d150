"""Plain-torch reference implementations, with the same signatures as the fused ops."""

from fastrlhf.reference.gae import gae, masked_whiten
from fastrlhf.reference.linear_logprobs import linear_logprobs
from fastrlhf.reference.logprobs import logprobs, selective_logprobs

__all__ = ["gae", "linear_logprobs", "logprobs", "masked_whiten", "selective_logprobs"]
