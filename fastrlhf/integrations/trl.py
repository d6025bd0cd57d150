"""``fastrlhf.integrations.trl.patch()``: TRL's per-token log-prob and entropy helpers on fastrlhf.

Replaced in ``trl.trainer.utils`` (and in every TRL module that imported them):

- ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)`` with one label per row:
  ``fastrlhf.logprobs`` with the temperature; rows where ``row_mask == 0`` give 0 and no gradient.
  The top-K form (``index`` of shape ``(..., K)``) goes to TRL's own function.
- ``entropy_from_logits(logits, chunk_size=128)``: the entropy of ``fastrlhf.logprobs``.
- ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
  row_mask=None)``: both from one pass.

Results are fp32 whatever the logits' dtype (fp64 for fp64 logits): TRL's own Triton kernel (its path
on CUDA) returns fp32 too; only its CPU fallback returns the logits' dtype. These functions serve TRL's
experimental trainers (CPO, ORPO, SDPO, SDFT, A2PO, TPO) and user code. Not replaced, because TRL 1.16
does not compute them in a separate function: GRPO, RLOO and DPO score tokens through ``add_fused_lm_head`` (TRL's own chunked
linear log-prob, which never builds the logits), and the DPO and reward-model sigmoid losses are written
inline in ``DPOTrainer._compute_loss`` and ``RewardTrainer.compute_loss``.
"""

from __future__ import annotations

import functools

import torch

import fastrlhf
from fastrlhf.integrations._patch import Patched, require
from fastrlhf.integrations._shared import entropy

TESTED = ("1.16.",)
MODULES = ("trl.trainer.utils",)
MASKED = -100


def patch() -> Patched:
    """Replaces TRL's functions listed in this module's docstring; returns the handle that restores them."""
    require("trl", MODULES, TESTED)
    return Patched("trl", replacements())


def replacements():
    return {
        "trl.trainer.utils:selective_log_softmax": selective_log_softmax,
        "trl.trainer.utils:entropy_from_logits": entropy_from_logits,
        "trl.trainer.utils:selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    }


def _covered(logits, index, row_mask) -> bool:
    return index.shape == logits.shape[:-1] and (row_mask is None or row_mask.shape == index.shape)


def _labels(index, row_mask):
    return index if row_mask is None else index.masked_fill(row_mask == 0, MASKED)


def selective_log_softmax(original):
    @functools.wraps(original)
    def replacement(logits, index, temperature=1.0, row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if not _covered(logits, index, row_mask):
            return original(logits, index, temperature, row_mask)
        return fastrlhf.logprobs(logits, _labels(index, row_mask), temperature=temperature, ignore_index=MASKED)
    return replacement


def entropy_from_logits(original):
    @functools.wraps(original)
    def replacement(logits, chunk_size=128):
        return entropy(logits)
    return replacement


def selective_log_softmax_and_entropy(original):
    @functools.wraps(original)
    def replacement(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if not _covered(logits, index, row_mask):
            return original(logits, index, entropy_requires_grad, temperature, row_mask)
        logp, ent = fastrlhf.logprobs(logits, _labels(index, row_mask), temperature=temperature,
                                      ignore_index=MASKED, return_entropy=True)
        return logp, ent if entropy_requires_grad else ent.detach()
    return replacement
