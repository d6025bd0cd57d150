"""verl's registered policy losses on ``fastrlhf.policy_loss`` (part of ``fastrlhf.integrations.verl.patch()``).

Replaced, in ``verl.trainer.ppo.core_algos`` and in ``POLICY_LOSS_REGISTRY`` (so ``get_policy_loss_fn``
returns them), with verl's signature ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
config, rollout_is_weights)``:

- ``vanilla``: ``ppo`` with ``dual_clip=config.clip_ratio_c`` (default 3); metrics ``actor/pg_clipfrac``,
  ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``.
- ``gspo``: ``gspo``; the same keys, ``actor/pg_clipfrac_lower`` 0.0.
- ``cispo``: ``cispo``; the same keys, ``actor/pg_clipfrac`` the fraction of ratios outside the range,
  ``actor/pg_clipfrac_lower`` 0.0.
- ``sapo``: ``sapo`` with ``config.tau_pos/neg``, always aggregated ``seq-mean-token-mean``; the same keys,
  both clip fractions 0.0.
- ``gpg``: ``reinforce``; no metrics (``{}``).
- ``agg_loss``: the same aggregation as one masked reduction (``reinforce`` with advantage -1).

The metrics are Python floats, as verl's, fetched from the device in one transfer (verl syncs once per
metric); verl's constant zeros need none.
The clip range is ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (each defaulting to ``config.clip_ratio``);
``rollout_is_weights`` multiply the token losses. ``loss_agg_mode`` and ``config.global_batch_info``
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) map onto verl's
``agg_loss`` exactly: ``token-mean`` divides by ``batch_num_tokens / dp_size``, ``token-sum`` is multiplied by
``dp_size``, the ``seq-*`` modes divide by ``global_batch_size / dp_size`` (``seq-mean-token-sum-norm`` also by
``loss_scale_factor``, default the padded length); without the global counts, this call's counts.

verl's own function runs instead (and raises what it raises) where the op does not cover the call: a
config verl rejects (None, the wrong config class, ``clip_ratio_c <= 1``, a negative clip ratio), a
``loss_agg_mode`` or ``global_batch_info`` that ``agg_loss`` rejects or that is not a plain positive number,
shapes that differ from ``log_prob``'s ``[B, T]``, mixed dtypes or devices, a floating-point mask (the op
reads masks as 0/1, bool or integer ones too, as verl's are), or ``old_log_prob`` / ``advantages`` / ``rollout_is_weights`` that require a gradient
(the op treats them as data, as verl's trainer does).

Where it differs from verl on covered calls (documented, not detectable without a host sync):
- masked tokens are never read: NaN or inf there does not reach the loss (verl multiplies by the mask);
- ``gspo`` clamps each token's log-ratio to +-20 before the sequence mean, and its ``ppo_kl`` metric is the
  mean of the clamped log-ratio (verl clamps neither); they agree unless a token's log-ratio exceeds 20;
- ``seq-mean-token-mean`` and the metric means divide by exact counts (verl adds 1e-8 to the denominators:
  below fp32 resolution, a relative 1e-8 / count in fp64).

The loss is fp32 (fp64 for fp64 inputs); with ``patch(match_dtype=True)`` it has the dtype of verl's:
``log_prob``'s for ``token-mean`` and ``token-sum``, at least fp32 for the ``seq-*`` modes (whose fp32
sequence masks promote a bf16 loss).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from typing import NamedTuple, Optional

import torch

import fastrlhf
from fastrlhf.integrations._shared import by_name
from fastrlhf import checks

CORE_ALGOS = "verl.trainer.ppo.core_algos"
GLOBAL_BATCH_KEYS = frozenset(("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"))
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")

# verl loss -> (fastrlhf loss_type, its metrics as (verl key, fastrlhf metric or None for verl's constant 0.0))
LOSSES = {
    "compute_policy_loss_vanilla": ("ppo", (("actor/pg_clipfrac", "clipfrac"), ("actor/ppo_kl", "ppo_kl"),
                                            ("actor/pg_clipfrac_lower", "dual_clipfrac"))),
    "compute_policy_loss_gspo": ("gspo", (("actor/pg_clipfrac", "clipfrac"), ("actor/ppo_kl", "ppo_kl"),
                                          ("actor/pg_clipfrac_lower", None))),
    "compute_policy_loss_cispo": ("cispo", (("actor/pg_clipfrac", "clipfrac"), ("actor/ppo_kl", "ppo_kl"),
                                            ("actor/pg_clipfrac_lower", None))),
    "compute_policy_loss_sapo": ("sapo", (("actor/pg_clipfrac", None), ("actor/ppo_kl", "ppo_kl"),
                                          ("actor/pg_clipfrac_lower", None))),
    "compute_policy_loss_gpg": ("reinforce", ()),
}


def replacements(match_dtype: bool = False) -> dict:
    losses = {f"{CORE_ALGOS}:{name}": functools.partial(_replacement, loss_type=loss_type, metric_keys=keys,
                                                        match_dtype=match_dtype)
              for name, (loss_type, keys) in LOSSES.items()}
    return {**losses, f"{CORE_ALGOS}:agg_loss": functools.partial(agg_loss, match_dtype=match_dtype)}


def agg_loss(original, *, match_dtype):
    """verl's ``agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor)`` as one fused masked reduction: ``policy_loss`` with ``loss_type="reinforce"`` and
    an advantage of -1 per sequence, whose token loss is ``loss_mat`` itself, aggregated (and differentiated)
    exactly as verl aggregates; masked entries are never read. verl's own function runs where the policy
    losses' would (a floating-point mask, a mode or count it rejects)."""
    def run(a):
        loss_mat, loss_mask = a["loss_mat"], a["loss_mask"]
        info = {k: a[k] for k in GLOBAL_BATCH_KEYS if a[k] is not None}
        covered = (isinstance(loss_mat, torch.Tensor) and loss_mat.dim() == 2 and loss_mat.shape[0] > 0
                   and _tensors_covered(loss_mat, loss_mat.detach(), loss_mat.detach(), loss_mask, None))
        aggregation = _aggregation(a["loss_agg_mode"], info, loss_mat) if covered else None
        if aggregation is None:
            return None
        options, scale, dtype = aggregation
        minus_one = loss_mat.new_full(loss_mat.shape[:1], -1.0)
        loss, _ = fastrlhf.policy_loss(loss_mat, loss_mat.detach(), minus_one, loss_mask, loss_type="reinforce",
                                       **options)
        loss = loss * scale if scale != 1 else loss
        return loss.to(dtype) if match_dtype else loss
    return by_name(original, run)


class Plan(NamedTuple):
    """How a covered verl call runs on ``fastrlhf.policy_loss``."""

    options: dict         # keyword options of fastrlhf.policy_loss (clips, temperatures, aggregation, counts)
    scale: float          # the loss is multiplied by it: dp_size for token-sum, else 1
    dtype: torch.dtype    # the dtype of verl's loss (for match_dtype)


def _replacement(original, *, loss_type, metric_keys, match_dtype):
    def run(a):
        plan = _plan(loss_type, **a)
        if plan is None:
            return None
        loss, metrics = fastrlhf.policy_loss(a["log_prob"], a["old_log_prob"], a["advantages"], a["response_mask"],
                                             loss_type=loss_type, rollout_is_weights=a["rollout_is_weights"],
                                             **plan.options)
        if plan.scale != 1:
            loss = loss * plan.scale
        if match_dtype:
            loss = loss.to(plan.dtype)
        return loss, _metrics(metrics, metric_keys)
    return by_name(original, run)


def _metrics(metrics: dict, metric_keys) -> dict:
    """verl's metrics dict: Python floats, fetched from the device in one transfer; verl's constant zeros
    need none."""
    fetched = [name for _, name in metric_keys if name is not None]
    values = iter(torch.stack([metrics[name] for name in fetched]).tolist() if fetched else ())
    return {key: 0.0 if name is None else next(values) for key, name in metric_keys}


def _plan(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
          rollout_is_weights) -> Optional[Plan]:
    """How ``fastrlhf.policy_loss`` reproduces verl's call, or None where verl's own function must run."""
    if not _tensors_covered(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights):
        return None
    options = _config_options(loss_type, config)
    if options is None:
        return None
    mode = "seq-mean-token-mean" if loss_type == "sapo" else loss_agg_mode
    aggregation = _aggregation(mode, config.global_batch_info, log_prob)
    if aggregation is None:
        return None
    return Plan({**options, **aggregation[0]}, *aggregation[1:])


def _tensors_covered(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights) -> bool:
    if not (isinstance(log_prob, torch.Tensor) and log_prob.dim() == 2 and log_prob.dtype in checks.FLOATS):
        return False
    data = [old_log_prob, advantages] + ([] if rollout_is_weights is None else [rollout_is_weights])
    for t in data:
        if not (isinstance(t, torch.Tensor) and t.shape == log_prob.shape and t.dtype == log_prob.dtype
                and t.device == log_prob.device and not t.requires_grad):
            return False
    return (isinstance(response_mask, torch.Tensor) and response_mask.shape == log_prob.shape
            and response_mask.device == log_prob.device
            and not (response_mask.is_floating_point() or response_mask.is_complex()))


def _config_options(loss_type, config):
    """Clip ratios / SAPO temperatures read from ``config`` as verl reads them, or None where verl would
    reject the config (its own function then raises)."""
    core_algos = sys.modules[CORE_ALGOS]
    if config is None:
        return None
    if loss_type == "ppo":
        if isinstance(config, core_algos.AlgoConfig):
            return None
    elif loss_type != "reinforce" and not isinstance(config, core_algos.ActorConfig):
        return None
    if loss_type == "reinforce":
        return {}
    if loss_type == "sapo":
        tau_pos, tau_neg = config.tau_pos, config.tau_neg
        if not all(_positive(t) for t in (tau_pos, tau_neg)):
            return None
        return {"sapo_tau_pos": float(tau_pos), "sapo_tau_neg": float(tau_neg)}
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    if not all(finite_number(c) and c >= 0 for c in (low, high)):
        return None
    options = {"clip_low": float(low), "clip_high": float(high)}
    if loss_type == "ppo":
        dual_clip = config.get("clip_ratio_c", 3.0)
        if not (finite_number(dual_clip) and dual_clip > 1):
            return None
        options["dual_clip"] = float(dual_clip)
    return options


def _aggregation(mode, global_batch_info, log_prob):
    """verl's ``agg_loss(loss_mat, mask, mode, **global_batch_info)`` as ``policy_loss`` aggregation options,
    the factor for the loss and the dtype of verl's loss, or None where it cannot be said exactly (or verl
    raises)."""
    info = dict(global_batch_info or {})
    if mode not in AGGREGATIONS or not set(info) <= GLOBAL_BATCH_KEYS:
        return None
    dp_size = info.get("dp_size", 1)
    if not (finite_number(dp_size) and dp_size >= 1):
        return None
    # agg_loss's fp32 sequence masks promote a bf16/fp16 loss in the seq-* modes
    dtype = torch.promote_types(log_prob.dtype, torch.float32) if mode.startswith("seq-") else log_prob.dtype
    if mode == "token-sum":
        return {"aggregation": mode}, dp_size, dtype
    count_key, option = ("batch_num_tokens", "num_tokens") if mode == "token-mean" else ("global_batch_size",
                                                                                          "num_sequences")
    count = info.get(count_key)
    options = {"aggregation": mode}
    if count is None:
        if dp_size != 1:
            return None  # verl raises: the global count is required
    elif _positive(count):
        options[option] = count / dp_size
    elif isinstance(count, torch.Tensor) and count.numel() == 1 and count.device == log_prob.device:
        options[option] = count.reshape(()) / dp_size  # stays on the device: no host sync
        dtype = torch.promote_types(dtype, count.dtype)
    else:
        return None
    if mode == "seq-mean-token-sum-norm":
        horizon = info.get("loss_scale_factor")
        horizon = log_prob.shape[-1] if horizon is None else horizon
        if not _positive(horizon):
            return None
        options["horizon"] = float(horizon)
    return options, 1, dtype


def finite_number(x) -> bool:
    """A finite real Python (or numpy) number, not a bool: what the ops take as a scalar option."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return finite_number(x) and x > 0
