"""``fastrlhf.integrations.liger``: Liger's fused linear GRPO loss on ``fastrlhf.linear_policy_loss``.

``FusedLinearGRPOLoss`` is a drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (a subclass
of it: same constructor, same ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages,
bias=None, ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None)``, same result: ``(loss, (metrics...))``, the
metrics Liger's: the mean k3 KL when ``beta != 0``, then the clip ratio, all 0-d fp32). ``patch()`` puts
it in place of Liger's class in ``liger_kernel`` (``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``
and every ``liger_kernel`` module that holds it), so code that builds the loss after ``patch()`` gets it.

Covered, with Liger's normalisations exactly (``B`` the batch, ``M`` the attention mask):

- token-level importance sampling, ``loss_type`` ``grpo`` (per-sequence token mean, summed, over B:
  ``seq-mean-token-mean`` with ``num_sequences=B``), ``bnpo`` (token mean over this batch), ``dr_grpo``
  (sum over ``B * max_completion_length``: ``seq-mean-token-sum-norm``), ``dapo`` (sum over
  ``num_items_in_batch / world_size``, or Liger's all-reduced token count, which Liger's own
  ``_compute_dapo_normalizer`` computes, once instead of once per chunk); these are ``ppo``-clipped with
  ``[1 - epsilon_low, 1 + epsilon_high]``; ``delta`` (INTELLECT-2's upper clamp of the unclipped ratio)
  is fastrlhf's ``dual_clip`` when ``delta >= 1 + epsilon_high`` (then they are the same function);
- ``cispo`` (``-sg(min(r, epsilon_high)) A logp``, dapo's normaliser; ``epsilon_high >= 1``) and ``sapo``
  (grpo's normaliser, Liger's two temperatures);
- sequence-level importance sampling (GSPO) for grpo, bnpo, dr_grpo and dapo: fastrlhf's gspo, whose
  token form has the gradient of Liger's sequence ratio because every normalisation weighs a sequence's
  tokens alike;
- ``vllm_is_ratio`` (``[B, T]``, ``[B, 1]`` or ``[B]``): the IS weights of the token loss;
- ``beta != 0`` without a reference model (``use_ref_model=False``): Liger's KL is then identically 0,
  and so is its metric;
- ``temperature``, ``bias``, ``old_per_token_logps=None`` (the ratio is 1: one extra forward pass computes
  the log-probs that serve as the old ones).

``chunk_size`` (Liger's sequences per chunk) and ``compiled`` are accepted and not used: fastrlhf picks its
own token chunks. Everything else runs Liger's own class: ``beta != 0`` with a reference model (Liger's KL
is k3 without clamps, fastrlhf's ``k3`` is verl's, clamped at 10, which binds from ``ref - logp > 2.6``),
``loss_type`` ``luspo`` and ``vespo``, ``use_bias_correction_kl`` with a KL term, ``delta < 1 +
epsilon_high``, ``delta`` with sequence-level sampling, ``cispo`` with ``epsilon_high < 1``, negative
epsilons, advantages other than ``[B]``, a weight (or bias) in another dtype than the hidden states, and
invalid configurations (Liger raises its own errors).

Differences within the covered options: fastrlhf clamps each token's log-ratio to +-20 and gspo's sequence
log-ratio above at 10 (where Liger's loss is at least 22026 |A|, or inf); ``attention_mask`` is read as
0/1 (Liger multiplies by it, so fractional weights would weigh tokens); labels equal to -100 are ignored
tokens (Liger has no ignore index and scores them as nonsense). The loss and metrics are fp32, as Liger's,
for every input dtype; the gradients are in the dtype of what they belong to. ``patch(match_dtype=...)``
is accepted for symmetry with the other integrations: nothing here returns log-probs or entropies.
"""

from __future__ import annotations

import functools

import torch

import fastrlhf
from fastrlhf.integrations._patch import Patched, require

TESTED = ("0.8.",)
MODULES = ("liger_kernel.chunked_loss.grpo_loss",)
TARGET = "liger_kernel.chunked_loss.grpo_loss:LigerFusedLinearGRPOLoss"
# Liger's loss type -> (fastrlhf's aggregation of the token loss, its normaliser); ppo-clipped unless named
NORMALISATION = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                 "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean", "cispo": "token-mean"}
PPO_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")


def patch(match_dtype: bool = False) -> Patched:
    """Puts ``FusedLinearGRPOLoss`` in place of Liger's ``LigerFusedLinearGRPOLoss``; returns the handle
    that restores it. ``match_dtype`` changes nothing here (Liger's loss is fp32, and so is this one)."""
    require("liger-kernel", MODULES, TESTED)
    drop_in = __getattr__("FusedLinearGRPOLoss")  # built from Liger's own class, before it is replaced
    return Patched("liger_kernel", {TARGET: lambda original: drop_in})


@functools.cache
def _drop_in() -> type:
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    class FusedLinearGRPOLoss(LigerFusedLinearGRPOLoss):
        """Liger's ``LigerFusedLinearGRPOLoss`` on ``fastrlhf.linear_policy_loss``: what it covers, and where it
        runs Liger's own forward, is in ``fastrlhf.integrations.liger``'s docstring."""

        def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                    ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                    ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
            options = _options(self, _input, lin_weight, attention_mask, advantages, bias)
            if options is None or (self.use_ref_model and ref_per_token_logps is None and ref_input is None):
                return super().forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                                       ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
                                       vllm_is_ratio, num_items_in_batch)
            return _loss(self, options, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                         old_per_token_logps, vllm_is_ratio, num_items_in_batch)

    FusedLinearGRPOLoss.__module__ = __name__
    FusedLinearGRPOLoss.__qualname__ = "FusedLinearGRPOLoss"
    return FusedLinearGRPOLoss


def __getattr__(name: str):
    # The drop-in subclasses Liger's class, so it exists only once Liger is imported: on first use.
    if name == "FusedLinearGRPOLoss":
        require("liger-kernel", MODULES, TESTED)
        return _drop_in()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _options(loss, hidden, weight, attention_mask, advantages, bias) -> dict | None:
    """``linear_policy_loss``'s options for this module's configuration, or None where Liger's class runs."""
    loss_type, sequence = loss.loss_type, loss.importance_sampling_level == "sequence"
    delta, eps_low, eps_high = loss.delta, loss.epsilon_low, loss.epsilon_high
    if (loss_type not in NORMALISATION or loss.importance_sampling_level not in ("token", "sequence")
            or (sequence and (loss_type not in PPO_CLIPPED or delta is not None))
            or (loss.beta != 0 and loss.use_ref_model)
            or (loss_type == "dr_grpo" and loss.max_completion_length is None)
            or not (eps_low >= 0 and eps_high >= 0) or (loss_type == "cispo" and not eps_high >= 1)
            or (delta is not None and loss_type in PPO_CLIPPED and not delta >= 1 + eps_high)
            or hidden.dim() != 3 or advantages.dim() != 1 or weight.dtype != hidden.dtype
            or (bias is not None and bias.dtype != hidden.dtype)):
        return None
    options = dict(aggregation=NORMALISATION[loss_type], temperature=loss.temperature)
    if loss_type == "cispo":
        options.update(loss_type="cispo", clip_low=None, clip_high=eps_high - 1)
    elif loss_type == "sapo":
        options.update(loss_type="sapo", sapo_tau_pos=loss.sapo_temperature_pos,
                       sapo_tau_neg=loss.sapo_temperature_neg)
    else:
        options.update(loss_type="gspo" if sequence else "ppo", clip_low=eps_low, clip_high=eps_high,
                       dual_clip=delta)
    if options["aggregation"] != "token-mean":
        options["num_sequences"] = attention_mask.shape[0]
    if loss_type == "dr_grpo":
        options["horizon"] = loss.max_completion_length
    return options


def _loss(loss, options, hidden, weight, labels, attention_mask, advantages, bias, old_logp, vllm_is_ratio,
          num_items_in_batch):
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    if old_logp is None:  # Liger's old log-probs are then the current ones, detached
        with torch.no_grad():
            old_logp = fastrlhf.linear_logprobs(hidden, weight, labels, bias=bias, temperature=loss.temperature)
    if loss.loss_type in ("dapo", "cispo"):
        options["num_tokens"] = LigerFusedLinearPPOBase._compute_dapo_normalizer(attention_mask, num_items_in_batch)
    elif loss.loss_type == "bnpo":
        options["num_tokens"] = attention_mask.sum().float().clamp(min=1.0)
    if vllm_is_ratio is not None:
        vllm_is_ratio = vllm_is_ratio.reshape(len(vllm_is_ratio), -1).expand(labels.shape)
    value, metrics = fastrlhf.linear_policy_loss(hidden, weight, labels, old_logp, advantages, attention_mask,
                                                 bias=bias, rollout_is_weights=vllm_is_ratio, **options)
    clipped = (metrics["clipfrac_low"] + metrics["clipfrac_high"]).float()
    kl = (torch.zeros_like(clipped),) if loss.beta != 0 else ()  # Liger's KL without a reference model: 0
    return value.float(), (*kl, clipped)
