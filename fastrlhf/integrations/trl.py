"""``fastrlhf.integrations.trl.patch()``: TRL's per-token log-prob and entropy helpers on fastrlhf.

Replaced in ``trl.trainer.utils`` (and in every TRL module that imported them):

- ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)`` with one label per row:
  ``fastrlhf.logprobs`` with the temperature; rows where ``row_mask == 0`` give 0 and no gradient.
  The top-K form (``index`` of shape ``(..., K)``) goes to TRL's own function.
- ``entropy_from_logits(logits, chunk_size=128)``: the entropy of ``fastrlhf.logprobs``.
- ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
  row_mask=None)``: both from one pass.
- ``trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
  final_logit_softcapping=None, logit_scale=1.0, outputs=<all>)``, the projection behind ``add_fused_lm_head``
  (how GRPO, RLOO and DPO score tokens without the logits): ``fastrlhf.linear_logprobs`` when the logits
  are neither soft-capped nor scaled and hidden states, weight and bias share the compute dtype (under
  autocast, its dtype). ``outputs`` defaults, as in TRL 1.16, to every optional output (entropy,
  ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``): the last three come from the same pass over the
  logits (``return_extras``), ``None`` where not asked for, as TRL returns them. Other calls
  (soft-capping, a logit scale, ``cast_lm_head_to_fp32`` with a bf16 head) run TRL's own kernel.
  ``chunk_size``, TRL's vocabulary tile width, is accepted and not used: fastrlhf picks its own tiling.
  Its results are fp32 as TRL's are (fp64 hidden states give fp64, or fp32 with ``match_dtype``).

Results are fp32 whatever the logits' dtype (fp64 for fp64 logits): TRL's own Triton kernel (its path
on CUDA) returns fp32 too; only its CPU fallback returns the logits' dtype. ``patch(match_dtype=True)``
returns instead the dtype TRL's own function returns for the same call (fp32 where it would take its
Triton kernel, else the logits' dtype), for code that relies on it. These functions serve TRL's
experimental trainers (CPO, ORPO, SDPO, SDFT, A2PO, TPO) and user code. Not replaced, because TRL 1.16
does not compute them in a separate function: the DPO and reward-model sigmoid losses, written inline
in ``DPOTrainer._compute_loss`` and ``RewardTrainer.compute_loss``.
"""

from __future__ import annotations

import functools
import sys

import torch

import fastrlhf
from fastrlhf.integrations._patch import Patched, require
from fastrlhf.integrations._shared import entropy, matching_dtype

TESTED = ("1.16.",)
MODULES = ("trl.trainer.utils", "trl.kernels.chunked_logprob")
# ChunkedLogProbFunction's optional outputs (its default ``outputs``) and those linear_logprobs gives
CHUNKED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
MASKED = -100


def patch(match_dtype: bool = False) -> Patched:
    """Replaces TRL's functions listed in this module's docstring; returns the handle that restores them.

    ``match_dtype``: log-probs and entropies in the dtype TRL's own function returns (see above) rather
    than fp32."""
    require("trl", MODULES, TESTED)
    return Patched("trl", replacements(match_dtype))


def replacements(match_dtype: bool = False):
    return {
        "trl.trainer.utils:selective_log_softmax": matching_dtype(selective_log_softmax, match_dtype,
                                                                  _selective_log_softmax_dtype),
        "trl.trainer.utils:entropy_from_logits": matching_dtype(entropy_from_logits, match_dtype, _entropy_dtype),
        "trl.trainer.utils:selective_log_softmax_and_entropy": matching_dtype(
            selective_log_softmax_and_entropy, match_dtype, _log_softmax_and_entropy_dtype),
        "trl.kernels.chunked_logprob:ChunkedLogProbFunction.apply": matching_dtype(
            chunked_logprob_apply, match_dtype, lambda *args, **kwargs: torch.float32),
    }


def _trl_dtype(logits, index=None, row_mask=None) -> torch.dtype:
    """What TRL's ``trainer.utils`` functions return: fp32 where they take TRL's Triton kernel (its own
    test of the inputs), else the logits' dtype (their log_softmax path)."""
    trl_utils = sys.modules["trl.trainer.utils"]
    kernel = trl_utils.is_triton_available() and trl_utils._supports_trl_loss_kernel(logits, index, row_mask)
    return torch.float32 if kernel else logits.dtype


# _trl_dtype for each function's own arguments
def _selective_log_softmax_dtype(logits, index, temperature=1.0, row_mask=None):
    return _trl_dtype(logits, index, row_mask)


def _entropy_dtype(logits, chunk_size=128):
    return _trl_dtype(logits)


def _log_softmax_and_entropy_dtype(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    return _trl_dtype(logits, index, row_mask)


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


def chunked_logprob_apply(original):
    @functools.wraps(original)
    def replacement(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0, outputs=CHUNKED_OUTPUTS):
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        if (final_logit_softcapping is not None or logit_scale != 1.0 or not hidden.dtype == weight.dtype == compute
                or (bias is not None and bias.dtype != compute)):
            return original(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                            logit_scale, outputs)
        extras = bool(set(outputs) & set(CHUNKED_OUTPUTS[1:]))
        with torch.autocast(device, enabled=False):
            out = fastrlhf.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           return_entropy=True, return_extras=extras)
        logp, *rest = out
        computed = dict(zip(CHUNKED_OUTPUTS, rest))
        # TRL returns each optional output it was asked for, and None for the others.
        return logp, *(computed[name] if name in outputs else None for name in CHUNKED_OUTPUTS)
    return replacement
