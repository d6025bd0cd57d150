"""What the integrations share: the logit dtypes ``fastrlhf.logprobs`` takes, and entropy alone from it."""

from __future__ import annotations

import torch

import fastrlhf

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """fp32 entropy of ``softmax(logits)`` over the last dim, in one pass (the labels are a dummy 0)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fastrlhf.logprobs(logits, labels, return_entropy=True)[1]
