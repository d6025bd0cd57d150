"""Entropy alone from ``fastrlhf.logprobs``, as the verl, TRL and OpenRLHF integrations all need it."""

from __future__ import annotations

import torch

import fastrlhf


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim (fp32; fp64 for fp64 logits), in one pass; the
    labels are a dummy 0."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fastrlhf.logprobs(logits, labels, return_entropy=True)[1]
