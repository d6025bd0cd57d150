"""``fastrlhf.integrations.liger``: Liger's fused linear GRPO loss on ``fastrlhf.linear_policy_loss``.

``FusedLinearGRPOLoss`` is a drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (a subclass
of it: same constructor, same ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages,
bias=None, ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None)``, same result: ``(loss, (metrics...))``, the
metrics Liger's: the mean k3 KL when ``beta != 0``, then the clip ratio, all 0-d fp32). ``patch()`` puts
it in place of Liger's class in ``liger_kernel`` (``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``
and every ``liger_kernel`` module that holds it), so code that builds the loss after ``patch()`` gets it.

Fused path, ``fastrlhf.linear_policy_loss`` (three GEMMs, the gradients formed in the forward), with
Liger's normalisations exactly (``B`` the batch):

- token-level importance sampling, ``loss_type`` ``grpo`` (per-sequence token mean, summed, over B:
  ``seq-mean-token-mean`` with ``num_sequences=B``), ``bnpo`` (token mean over this batch), ``dr_grpo``
  (sum over ``B * max_completion_length``: ``seq-mean-token-sum-norm``), ``dapo`` (sum over
  ``num_items_in_batch / world_size``, or Liger's all-reduced token count, which Liger's own
  ``_compute_dapo_normalizer`` computes, once instead of once per chunk); these are ``ppo``-clipped with
  ``[1 - epsilon_low, 1 + epsilon_high]``; ``delta`` (INTELLECT-2's upper clamp of the unclipped ratio)
  is fastrlhf's ``dual_clip`` when ``delta >= 1 + epsilon_high`` (then they are the same function);
- ``cispo`` (``-sg(min(r, epsilon_high)) A logp``, dapo's normaliser; ``epsilon_high >= 1``) and ``sapo``
  (grpo's normaliser, Liger's two temperatures);
- sequence-level importance sampling (GSPO) for grpo, bnpo, dr_grpo and dapo without ``delta``: fastrlhf's
  gspo, whose token form has the gradient of Liger's sequence ratio, because the advantage is one per
  sequence and every normalisation weighs a sequence's tokens alike;
- ``vllm_is_ratio`` (``[B, T]``, ``[B, 1]`` or ``[B]``): the IS weights of the token loss;
- ``beta`` without a reference model (``use_ref_model=False``): Liger's KL is then identically 0, and so
  is its metric;
- ``temperature``, ``bias``, ``old_per_token_logps=None`` (the ratio is 1: one more forward pass computes
  the log-probs that serve as the old ones), ``num_items_in_batch``.

Every other configuration Liger accepts runs Liger's own per-token loss function (``ppo_loss_fn``, plain
torch) on ``fastrlhf.linear_logprobs``' log-probs (four GEMMs, as Liger's), the reference model's too when
``ref_input`` is given: ``beta != 0`` with a reference model (Liger's KL is k3 without clamps, where
fastrlhf's ``k3`` is verl's, clamped at 10, which binds from ``ref - logp > 2.6``),
``use_bias_correction_kl``, ``loss_type`` ``luspo`` and ``vespo``, ``delta < 1 + epsilon_high`` or with
sequence-level sampling, ``cispo`` with ``epsilon_high < 1``, negative epsilons.

Liger's own class runs for configurations it refuses (it raises its own error: ``use_ref_model`` without
reference inputs, ``dr_grpo`` without ``max_completion_length``, sequence-level cispo, sapo or vespo,
unknown names, a bad ``vllm_is_ratio`` shape), for advantages other than ``[B]``, and for a weight or bias
(the policy's, or the reference's) in another dtype than its hidden states. ``chunk_size`` (Liger's
sequences per chunk) and ``compiled`` are accepted and not used: fastrlhf picks its own token chunks.

Differences on the fused path: fastrlhf clamps each token's log-ratio to +-20 and gspo's sequence
log-ratio above at 10 (where Liger's loss is at least 22026 |A|, or inf), and reads ``attention_mask`` as
0/1 (Liger multiplies by it, so fractional weights would weigh tokens). A label of -100 is fastrlhf's ignore
index: the fused path drops the token from the mask, the other gives it log-prob 0 (Liger has no ignore
index and scores such a label as nonsense; valid token ids are the same everywhere). The loss
and metrics are fp32, as Liger's, for every input dtype; the gradients are in the dtype of what they
belong to. ``patch(match_dtype=...)`` is accepted for symmetry with the other integrations: nothing here
returns log-probs or entropies.
"""

from __future__ import annotations

import functools

import torch

import fastrlhf
from fastrlhf.integrations._patch import Patched, require

TESTED = ("0.8.",)
MODULES = ("liger_kernel.chunked_loss.grpo_loss",)
TARGET = "liger_kernel.chunked_loss.grpo_loss:LigerFusedLinearGRPOLoss"
# Liger's loss types that linear_policy_loss reproduces -> its aggregation (and the normaliser _fused_loss passes)
NORMALISATION = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                 "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean", "cispo": "token-mean"}
PPO_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")
LOSS_TYPES = (*NORMALISATION, "luspo", "vespo")


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
        """Liger's ``LigerFusedLinearGRPOLoss`` on ``fastrlhf.linear_policy_loss`` (or ``fastrlhf.linear_logprobs``
        and Liger's per-token loss); the paths, and where Liger's own forward runs, are in
        ``fastrlhf.integrations.liger``'s docstring."""

        def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                    ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                    ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
            ref = ref_per_token_logps if ref_per_token_logps is not None else (ref_input, ref_weight, ref_bias)
            if not _valid(self, _input, lin_weight, attention_mask, advantages, bias, ref, vllm_is_ratio):
                return super().forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                                       ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
                                       vllm_is_ratio, num_items_in_batch)
            if vllm_is_ratio is not None:
                vllm_is_ratio = vllm_is_ratio.reshape(len(vllm_is_ratio), -1)  # [B] -> [B, 1], as Liger
            options = _options(self)
            if options is not None:
                return _fused_loss(self, options, _input, lin_weight, selected_token_ids, attention_mask, advantages,
                                   bias, old_per_token_logps, vllm_is_ratio, num_items_in_batch)
            return _loss_on_logprobs(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                                     ref, old_per_token_logps, vllm_is_ratio, num_items_in_batch)

    FusedLinearGRPOLoss.__module__ = __name__
    FusedLinearGRPOLoss.__qualname__ = "FusedLinearGRPOLoss"
    return FusedLinearGRPOLoss


def __getattr__(name: str):
    # The drop-in subclasses Liger's class, so it exists only once Liger is imported: on first use.
    if name == "FusedLinearGRPOLoss":
        require("liger-kernel", MODULES, TESTED)
        return _drop_in()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _valid(loss, hidden, weight, attention_mask, advantages, bias, ref, vllm_is_ratio) -> bool:
    """Whether fastrlhf runs this call: a configuration Liger accepts (else its class raises its own error)
    with inputs fastrlhf's linear ops take (one dtype for each head's hidden states, weight and bias)."""
    sequence = loss.importance_sampling_level == "sequence"
    if (loss.importance_sampling_level not in ("token", "sequence") or loss.loss_type not in LOSS_TYPES
            or (sequence and loss.loss_type in ("cispo", "sapo", "vespo"))
            or (loss.loss_type == "dr_grpo" and loss.max_completion_length is None)):
        return False
    heads = [(hidden, weight, bias)]
    if loss.use_ref_model and isinstance(ref, tuple):  # Liger scores the reference head's hidden states
        if ref[0] is None or ref[1] is None:
            return False
        heads.append(ref)
    batch, length = attention_mask.shape
    return (all(h.dim() == 3 and w.dtype == h.dtype and (b is None or b.dtype == h.dtype) for h, w, b in heads)
            and advantages.dim() == 1
            and (vllm_is_ratio is None or tuple(vllm_is_ratio.shape) in ((batch,), (batch, 1), (batch, length))))


def _options(loss) -> dict | None:
    """``linear_policy_loss``'s options for this configuration, or None where it is not one of them."""
    loss_type, sequence = loss.loss_type, loss.importance_sampling_level == "sequence"
    delta, eps_low, eps_high = loss.delta, loss.epsilon_low, loss.epsilon_high
    if (loss_type not in NORMALISATION or (loss.beta != 0 and loss.use_ref_model)
            or not (eps_low >= 0 and eps_high >= 0) or (loss_type == "cispo" and not eps_high >= 1)
            or (delta is not None and loss_type in PPO_CLIPPED and (sequence or not delta >= 1 + eps_high))):
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
    if loss_type == "dr_grpo":
        options["horizon"] = loss.max_completion_length
    return options


def _fused_loss(loss, options, hidden, weight, labels, attention_mask, advantages, bias, old_logp, vllm_is_ratio,
                num_items_in_batch):
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    if old_logp is None:  # Liger's old log-probs are then the current ones, detached
        with torch.no_grad():
            old_logp = fastrlhf.linear_logprobs(hidden, weight, labels, bias=bias, temperature=loss.temperature)
    if loss.loss_type in ("dapo", "cispo"):
        options["num_tokens"] = LigerFusedLinearPPOBase._compute_dapo_normalizer(attention_mask, num_items_in_batch)
    elif loss.loss_type == "bnpo":
        options["num_tokens"] = attention_mask.sum().float().clamp(min=1.0)
    else:  # per-sequence normalisations divide by the whole batch, empty sequences included
        options["num_sequences"] = attention_mask.shape[0]
    if vllm_is_ratio is not None:
        vllm_is_ratio = vllm_is_ratio.expand(labels.shape)
    value, metrics = fastrlhf.linear_policy_loss(hidden, weight, labels, old_logp, advantages, attention_mask,
                                                 bias=bias, rollout_is_weights=vllm_is_ratio, **options)
    clipped = (metrics["clipfrac_low"] + metrics["clipfrac_high"]).float()
    kl = (torch.zeros_like(clipped),) if loss.beta != 0 else ()  # Liger's KL without a reference model: 0
    return value.float(), (*kl, clipped)


def _loss_on_logprobs(loss, hidden, weight, labels, attention_mask, advantages, bias, ref, old_logp, vllm_is_ratio,
                      num_items_in_batch):
    """Liger's own per-token loss (``ppo_loss_fn``, plain torch) on ``fastrlhf.linear_logprobs``' log-probs, the
    reference log-probs scored by it too: every option Liger has, exactly."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    logp = fastrlhf.linear_logprobs(hidden, weight, labels, bias=bias, temperature=loss.temperature)
    if not loss.use_ref_model:
        ref = None
    elif isinstance(ref, tuple):
        with torch.no_grad():
            ref = fastrlhf.linear_logprobs(ref[0], ref[1], labels, bias=ref[2], temperature=loss.temperature)
    value, metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=logp, attention_mask=attention_mask, advantages=advantages,
        full_attention_mask=attention_mask, ref_per_token_logps=None if ref is None else ref.to(logp.dtype),
        old_per_token_logps=None if old_logp is None else old_logp.to(logp.dtype), epsilon_low=loss.epsilon_low,
        epsilon_high=loss.epsilon_high, beta=loss.beta, loss_type=loss.loss_type,
        max_completion_length=loss.max_completion_length, importance_sampling_level=loss.importance_sampling_level,
        sapo_temperature_pos=loss.sapo_temperature_pos, sapo_temperature_neg=loss.sapo_temperature_neg,
        vllm_is_ratio=vllm_is_ratio, delta=loss.delta, use_bias_correction_kl=loss.use_bias_correction_kl,
        vespo_k_pos=loss.vespo_k_pos, vespo_lambda_pos=loss.vespo_lambda_pos, vespo_k_neg=loss.vespo_k_neg,
        vespo_lambda_neg=loss.vespo_lambda_neg, num_items_in_batch=num_items_in_batch)
    return value.float(), tuple(m.detach().float() for m in metrics)
