"""Pairwise sigmoid losses: ``fastrlhf.pairwise_sigmoid_loss``, ``fastrlhf.reward_model_loss``, ``fastrlhf.dpo_loss``.

All three reduce to pairs with a logit ``h = u - v - m`` (u, v: chosen and rejected rewards or log-ratios,
m: a margin). One forward kernel per backend computes each pair's loss with a stable formula in fp32 (fp64
for fp64), the reduction, the statistics and per-pair gradient factors ``dL/du``, ``dL/dv`` in one pass; the
backward multiplies the factors by the incoming gradient (pair ops) or scatters them to the pooled tokens
(reward model). Registered as ``fastrlhf::pairwise_forward``, ``fastrlhf::reward_model_forward`` and
``fastrlhf::reward_model_backward`` with fake implementations and autograd, so they run under
``torch.compile(fullgraph=True)``. CPU tensors run the C++ kernels, CUDA tensors the Triton kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference

# Codes and layouts shared with csrc/pairwise.cpp and fastrlhf/kernels/pairwise.py.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REDUCTIONS = ("none", "mean", "sum")
STATS = ("accuracy", "tie_rate", "chosen_reward", "rejected_reward", "margin")
NUM_STATS = len(STATS) + 1  # then the number of tokens of the LM term (reward model only)


def pairwise_sigmoid_loss(chosen: Tensor, rejected: Tensor, *, margin: float | Tensor | None = None,
                          beta: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """``-(1 - eps) logsigmoid(d) - eps logsigmoid(-d)`` with ``d = beta (chosen - rejected - margin)``.

    Args:
        chosen, rejected: float tensors (fp32, fp64, bf16, fp16) of one shape with at least one element.
        margin: a float, or a tensor like ``chosen`` (cast to its dtype); differentiable when a tensor.
        beta: positive; label_smoothing ``eps`` in [0, 1] (the conservative form of cDPO).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the per-pair losses, shaped like ``chosen``).

    Returns the loss in fp32 (fp64 for fp64 inputs). Computed as softplus in fp32, so it is finite for any
    finite gap (``|d|`` up to 1e4 and beyond) and the gradient of a badly wrong pair tends to ``-beta (1 - eps)``
    instead of vanishing. Differentiable with respect to ``chosen``, ``rejected`` and ``margin``.
    """
    if backend.forced_backend() == "reference":
        return reference.pairwise_sigmoid_loss(chosen, rejected, margin=margin, beta=beta,
                                               label_smoothing=label_smoothing, reduction=reduction)
    _check_pair("chosen", chosen, {"rejected": rejected})
    margin = _margin(margin, chosen)
    _check_beta(beta)
    checks.unit_interval("label_smoothing", label_smoothing)
    return _pairs(chosen, rejected, None, None, margin, beta, label_smoothing, "sigmoid", reduction, 1.0)[0]


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO loss family on ``h = (pi_w - ref_w) - (pi_l - ref_l)``, as TRL's ``DPOTrainer`` defines it.

    Args:
        policy_chosen_logps, ...: the four sequence log-probs, float tensors of one shape and dtype.
        loss_type: ``"sigmoid"`` (``pairwise_sigmoid_loss`` of ``h`` with ``beta`` and label smoothing),
            ``"ipo"`` (``(h - 1 / (2 beta))^2``; feed length-averaged log-probs, as TRL does for IPO),
            ``"hinge"`` (``relu(1 - beta h)``) or ``"robust"`` (Chowdhury et al.:
            ``((1 - eps) softplus(-beta h) - eps softplus(beta h)) / (1 - 2 eps)``, eps < 0.5).
            ``label_smoothing`` applies to sigmoid and robust only.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns ``(loss, stats)``: loss as in ``pairwise_sigmoid_loss``; ``stats`` holds detached 0-d tensors:
    ``chosen_reward`` and ``rejected_reward`` (means of the implicit rewards ``beta (pi - ref)``),
    ``accuracy`` (chosen reward above rejected; a tie counts 0.5, where TRL counts 0), ``tie_rate`` and
    ``margin`` (mean chosen minus rejected reward). Differentiable with respect to all four log-probs.
    """
    if backend.forced_backend() == "reference":
        return reference.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                  reduction=reduction)
    _check_pair("policy_chosen_logps", policy_chosen_logps, {"policy_rejected_logps": policy_rejected_logps,
                                                             "ref_chosen_logps": ref_chosen_logps,
                                                             "ref_rejected_logps": ref_rejected_logps})
    checks.one_of("loss_type", loss_type, LOSS_TYPES)
    _check_beta(beta)
    checks.unit_interval("label_smoothing", label_smoothing)
    if loss_type in ("ipo", "hinge") and label_smoothing != 0:
        raise ValueError(f"label_smoothing: expected 0 for loss_type={loss_type!r}, got {label_smoothing}")
    if loss_type == "robust" and not label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value below 0.5 for loss_type='robust', got {label_smoothing}")
    return _pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, None, beta,
                  label_smoothing, loss_type, reduction, beta)


def reward_model_loss(chosen_values: Tensor, rejected_values: Tensor, *, chosen_mask: Tensor, rejected_mask: Tensor,
                      margin: float | Tensor | None = None, rank_coef: float = 1.0, center_coef: float = 0.0,
                      chosen_logprobs: Optional[Tensor] = None, lm_coef: float = 0.0
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss on per-token value-head outputs, pooled at each row's last unmasked token.

    Args:
        chosen_values, rejected_values: ``[B, T_w]`` and ``[B, T_l]`` float (one dtype), B >= 1.
        chosen_mask, rejected_mask: bool or 0/1, shaped like the values. Each row's reward is its value at
            the last position where the mask is set: left or right padding and holes all work, and the pad
            token id is never consulted (pad == eos cannot move it). Every row needs a set element:
            where ``fastrlhf.checks.values_checked`` allows a host read (CPU, or CUDA with
            ``FASTRLHF_CHECKS=1``) a row without one raises ValueError naming it; elsewhere (the default
            CUDA path, which never syncs with the host, and compiled calls) its reward is NaN, so the
            loss and the reward statistics are NaN.
        margin: a float or ``[B]`` tensor subtracted from ``r_w - r_l`` (not differentiated).
        chosen_logprobs: ``[B, T_w]`` log-probs of the chosen tokens (e.g. from ``fastrlhf.logprobs``,
            aligned with ``chosen_mask``), any float dtype; required when ``lm_coef`` is not 0.

    ``loss = rank_coef * mean(-logsigmoid(r_w - r_l - margin)) + center_coef * mean((r_w + r_l)^2)
    + lm_coef * (-sum(logp * mask) / sum(mask))`` (the last term over ``chosen_mask``, a token mean over
    the batch), fp32 (fp64 for fp64). ``stats``: detached 0-d tensors ``accuracy`` (r_w > r_l, a tie counts
    0.5), ``tie_rate``, ``chosen_reward`` (mean r_w), ``rejected_reward`` and ``margin`` (mean r_w - r_l).
    Differentiable with respect to both values and ``chosen_logprobs``.
    """
    if backend.forced_backend() == "reference":
        return reference.reward_model_loss(chosen_values, rejected_values, chosen_mask=chosen_mask,
                                           rejected_mask=rejected_mask, margin=margin, rank_coef=rank_coef,
                                           center_coef=center_coef, chosen_logprobs=chosen_logprobs,
                                           lm_coef=lm_coef)
    args = _canonical_reward_model(chosen_values, rejected_values, chosen_mask, rejected_mask, margin,
                                   chosen_logprobs, rank_coef, center_coef, lm_coef)
    if _differentiable(chosen_values, rejected_values, chosen_logprobs):
        loss, stats, _, index = torch.ops.fastrlhf.reward_model_forward(*args)
    else:
        loss, stats, _, index = _reward_model_forward(*args)
    if checks.values_checked(index):
        _check_every_row_pooled(index)
    return loss, _stats(stats)


def _check_pair(name, first, others):
    checks.dtype(name, first, checks.FLOATS)
    if first.numel() == 0:
        raise ValueError(f"{name}: expected at least one pair, got shape {tuple(first.shape)}")
    for other_name, other in others.items():
        checks.dtype(other_name, other, (first.dtype,))
        checks.shape(other_name, other, first.shape)
        checks.device(other_name, other, first.device)


def _check_beta(beta):
    if not 0 < float(beta) < float("inf"):
        raise ValueError(f"beta: expected a positive finite value, got {beta}")


def _margin(margin, like):
    """None, or a tensor of ``like``'s shape and dtype (a float margin becomes a constant tensor)."""
    if margin is None:
        return None
    if not isinstance(margin, Tensor):
        return torch.full(like.shape, float(margin), dtype=like.dtype, device=like.device)
    checks.shape("margin", margin, like.shape)
    checks.device("margin", margin, like.device)
    if not margin.is_floating_point():
        raise TypeError(f"margin: expected a float tensor, got {margin.dtype}")
    return margin.to(like.dtype)


def _differentiable(*tensors):
    """Whether the call must go through the registered op (for autograd or for torch.compile)."""
    # The registered op costs ~20 us of dispatch per call on CPU; calls without gradient skip it.
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _stats(stats):
    return {name: stats[k] for k, name in enumerate(STATS)}


def _pairs(chosen, rejected, ref_chosen, ref_rejected, margin, beta, label_smoothing, loss_type, reduction,
           reward_scale):
    checks.one_of("reduction", reduction, REDUCTIONS)
    flat = [None if t is None else t.contiguous().view(-1) for t in (chosen, rejected, ref_chosen, ref_rejected,
                                                                     margin)]
    args = (*flat, float(beta), float(label_smoothing), LOSS_TYPES.index(loss_type), REDUCTIONS.index(reduction),
            float(reward_scale))
    if _differentiable(*flat):
        loss, stats, _ = torch.ops.fastrlhf.pairwise_forward(*args)
    else:
        loss, stats, _ = _pairwise_forward(*args)
    return (loss.view(chosen.shape) if reduction == "none" else loss), _stats(stats)


def _pairwise_outputs(chosen, reduction):
    """Empty (loss, stats, factors) for ``n`` pairs: fp32, or fp64 for fp64 inputs."""
    n = chosen.numel()
    acc = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    like = chosen.new_empty((), dtype=acc)
    per_pair = reduction == REDUCTIONS.index("none")
    return like.new_empty(n if per_pair else ()), like.new_empty(NUM_STATS), like.new_empty(2, n)


def _pairwise_forward(chosen, rejected, ref_chosen, ref_rejected, margin, beta, label_smoothing, loss_type,
                      reduction, reward_scale):
    loss, stats, factors = (backend.empty_outputs(t, 1)[0] for t in _pairwise_outputs(chosen, reduction))
    backend.kernels("pairwise", chosen).pairwise_forward(chosen, rejected, ref_chosen, ref_rejected, margin, beta,
                                                         label_smoothing, loss_type, reduction, reward_scale, loss,
                                                         stats, factors)
    return loss, stats, factors


@torch.library.custom_op("fastrlhf::pairwise_forward", mutates_args=())
def pairwise_forward(chosen: Tensor, rejected: Tensor, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                     margin: Optional[Tensor], beta: float, label_smoothing: float, loss_type: int, reduction: int,
                     reward_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Flat ``[n]`` inputs; returns the loss (``[n]`` or 0-d), ``[NUM_STATS]`` stats (means of the rewards
    scaled by ``reward_scale``) and ``[2, n]`` gradient factors (``dL/du``, ``dL/dv``)."""
    return _pairwise_forward(chosen, rejected, ref_chosen, ref_rejected, margin, beta, label_smoothing, loss_type,
                             reduction, reward_scale)


@pairwise_forward.register_fake
def _(chosen, rejected, ref_chosen, ref_rejected, margin, beta, label_smoothing, loss_type, reduction, reward_scale):
    return _pairwise_outputs(chosen, reduction)


def _setup_pairwise(ctx, inputs, output):
    chosen, rejected, ref_chosen, ref_rejected, margin = inputs[:5]
    ctx.save_for_backward(output[2])
    ctx.dtypes = [None if t is None else t.dtype for t in (chosen, rejected, ref_chosen, ref_rejected, margin)]
    ctx.mark_non_differentiable(output[1], output[2])


def _first_order_only():
    # The saved factors carry no graph: a second derivative would silently miss their dependence on the
    # inputs, so create_graph=True is refused rather than answered wrongly.
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("fastrlhf's pairwise losses have no double backward: call backward without "
                           "create_graph=True")


def _pairwise_backward(ctx, grad_loss, _grad_stats, _grad_factors):
    _first_order_only()
    (factors,) = ctx.saved_tensors
    grad_u, grad_v = factors * grad_loss
    # h = (chosen - ref_chosen) - (rejected - ref_rejected) - margin
    grads = (grad_u, grad_v, -grad_u, -grad_v, -grad_u)
    return (*(None if d is None else g.to(d) for g, d in zip(grads, ctx.dtypes)), None, None, None, None, None)


pairwise_forward.register_autograd(_pairwise_backward, setup_context=_setup_pairwise)


def _canonical_reward_model(chosen_values, rejected_values, chosen_mask, rejected_mask, margin, chosen_logprobs,
                            rank_coef, center_coef, lm_coef):
    """Checks the arguments; returns them in the kernels' form (contiguous, bool masks, a [B] margin)."""
    checks.dtype("chosen_values", chosen_values, checks.FLOATS)
    checks.ndim("chosen_values", chosen_values, (2,))
    rows = chosen_values.shape[0]
    if rows == 0:
        raise ValueError(f"chosen_values: expected at least one pair, got shape {tuple(chosen_values.shape)}")
    checks.dtype("rejected_values", rejected_values, (chosen_values.dtype,))
    checks.ndim("rejected_values", rejected_values, (2,))
    checks.shape("rejected_values", rejected_values, (rows, rejected_values.shape[1]))
    checks.device("rejected_values", rejected_values, chosen_values.device)
    masks = [_bool_mask(name, mask, values) for name, mask, values in
             (("chosen_mask", chosen_mask, chosen_values), ("rejected_mask", rejected_mask, rejected_values))]
    if chosen_logprobs is not None:
        checks.dtype("chosen_logprobs", chosen_logprobs, checks.FLOATS)
        checks.shape("chosen_logprobs", chosen_logprobs, chosen_values.shape)
        checks.device("chosen_logprobs", chosen_logprobs, chosen_values.device)
        chosen_logprobs = chosen_logprobs.contiguous()
    elif lm_coef != 0:
        raise ValueError(f"chosen_logprobs: expected a [B, T] tensor when lm_coef is not 0, got None (lm_coef={lm_coef})")
    margin = _margin(margin, chosen_values.new_empty(rows))
    return (chosen_values.contiguous(), rejected_values.contiguous(), *masks,
            None if margin is None else margin.detach().contiguous(), chosen_logprobs, float(rank_coef),
            float(center_coef), float(lm_coef))


def _bool_mask(name, mask, values):
    checks.tensor(name, mask)
    checks.shape(name, mask, values.shape)
    checks.device(name, mask, values.device)
    if mask.is_complex():
        raise TypeError(f"{name}: expected bool or 0/1 numbers, got {mask.dtype}")
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()


def _check_every_row_pooled(index):
    if not bool((index < 0).any()):  # one host read in the common case
        return
    for side, name in enumerate(("chosen_mask", "rejected_mask")):
        empty = (index[side] < 0).nonzero()
        if empty.numel():
            raise ValueError(f"{name}: expected at least one unmasked token in every row, row {empty[0, 0].item()} "
                             f"has none ({empty.numel()} such rows)")


def _reward_model_outputs(chosen_values):
    rows = chosen_values.shape[0]
    loss, stats, factors = _pairwise_outputs(chosen_values.new_empty(rows), REDUCTIONS.index("mean"))
    return loss, stats, factors, chosen_values.new_empty(2, rows, dtype=torch.int64)


def _reward_model_forward(chosen_values, rejected_values, chosen_mask, rejected_mask, margin, chosen_logprobs,
                          rank_coef, center_coef, lm_coef):
    *floats, index = _reward_model_outputs(chosen_values)
    loss, stats, factors = (backend.empty_outputs(t, 1)[0] for t in floats)
    backend.kernels("pairwise", chosen_values).reward_model_forward(
        chosen_values, rejected_values, chosen_mask, rejected_mask, margin, chosen_logprobs, rank_coef, center_coef,
        lm_coef, loss, stats, factors, index)
    return loss, stats, factors, index


@torch.library.custom_op("fastrlhf::reward_model_forward", mutates_args=())
def reward_model_forward(chosen_values: Tensor, rejected_values: Tensor, chosen_mask: Tensor, rejected_mask: Tensor,
                         margin: Optional[Tensor], chosen_logprobs: Optional[Tensor], rank_coef: float,
                         center_coef: float, lm_coef: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """0-d loss, ``[NUM_STATS]`` stats (the last: LM tokens), ``[2, B]`` gradient factors of the pooled
    rewards and ``[2, B]`` int64 pooled positions (-1 for a row with no unmasked token)."""
    return _reward_model_forward(chosen_values, rejected_values, chosen_mask, rejected_mask, margin, chosen_logprobs,
                                 rank_coef, center_coef, lm_coef)


@reward_model_forward.register_fake
def _(chosen_values, rejected_values, chosen_mask, rejected_mask, margin, chosen_logprobs, rank_coef, center_coef,
      lm_coef):
    return _reward_model_outputs(chosen_values)


@torch.library.custom_op("fastrlhf::reward_model_backward", mutates_args=())
def reward_model_backward(grad_loss: Tensor, factors: Tensor, index: Tensor, stats: Tensor, chosen_mask: Tensor,
                          rejected_mask: Tensor, lm_coef: float, values_dtype: torch.dtype,
                          logprobs_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the chosen and rejected values (zero but at the pooled tokens) and of the chosen
    log-probs (``-lm_coef * grad / tokens`` where ``chosen_mask`` is set; empty without log-probs)."""
    grad_chosen, grad_rejected, grad_logprobs = (backend.empty_outputs(t, 1)[0] for t in _reward_model_grads(
        chosen_mask, rejected_mask, values_dtype, logprobs_dtype))
    backend.kernels("pairwise", grad_loss).reward_model_backward(
        grad_loss, factors, index, stats, chosen_mask, lm_coef, logprobs_dtype is not None, grad_chosen,
        grad_rejected, grad_logprobs)
    return grad_chosen, grad_rejected, grad_logprobs


def _reward_model_grads(chosen_mask, rejected_mask, values_dtype, logprobs_dtype):
    return (torch.empty_like(chosen_mask, dtype=values_dtype), torch.empty_like(rejected_mask, dtype=values_dtype),
            chosen_mask.new_empty(chosen_mask.shape if logprobs_dtype else (0,), dtype=logprobs_dtype or values_dtype))


@reward_model_backward.register_fake
def _(grad_loss, factors, index, stats, chosen_mask, rejected_mask, lm_coef, values_dtype, logprobs_dtype):
    return _reward_model_grads(chosen_mask, rejected_mask, values_dtype, logprobs_dtype)


def _setup_reward_model(ctx, inputs, output):
    chosen_values, _, chosen_mask, rejected_mask, _, chosen_logprobs, _, _, lm_coef = inputs
    _, stats, factors, index = output
    ctx.save_for_backward(factors, index, stats, chosen_mask, rejected_mask)
    ctx.lm_coef = lm_coef
    ctx.dtypes = chosen_values.dtype, None if chosen_logprobs is None else chosen_logprobs.dtype
    ctx.mark_non_differentiable(stats, factors, index)


def _reward_model_backward(ctx, grad_loss, _grad_stats, _grad_factors, _grad_index):
    _first_order_only()
    factors, index, stats, chosen_mask, rejected_mask = ctx.saved_tensors
    grad_chosen, grad_rejected, grad_logprobs = torch.ops.fastrlhf.reward_model_backward(
        grad_loss.to(factors.dtype).contiguous(), factors, index, stats, chosen_mask, rejected_mask, ctx.lm_coef,
        *ctx.dtypes)
    return (grad_chosen, grad_rejected, None, None, None, grad_logprobs if ctx.dtypes[1] else None, None, None, None)


reward_model_forward.register_autograd(_reward_model_backward, setup_context=_setup_reward_model)
