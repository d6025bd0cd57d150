"""``fastrlhf.linear_policy_loss``: the policy-gradient loss straight from hidden states, with the gradients of
hidden, weight and bias formed during the forward.

Every term of ``fastrlhf.policy_loss`` is a sum of per-token functions with denominators known before the
loss (``plan_policy_loss``), so a token's gradient with respect to its logits is known as soon as its logits
are. The forward therefore walks the tokens a chunk at a time and, per chunk, does three GEMMs:

1. ``logits = hidden[chunk] @ weight.T + bias`` into one reused ``[chunk, V]`` buffer;
2. the log-prob kernel (``fastrlhf.logprobs``: log-prob, entropy, logsumexp per token), then the policy
   loss's token pass (``policy_loss_tokens``: ``d loss / d logp`` and ``d loss / d entropy`` per token and
   partial sums of the loss and metrics), then the log-prob backward kernel, which overwrites the buffer
   with ``G = d loss / d logits``;
3. ``grad_hidden[chunk] = G @ weight``, ``grad_weight += G.T @ hidden[chunk]``, ``grad_bias += G.sum(0)``.

The backward only scales the three gradients by the incoming gradient of the loss. That is the unfused
path's three ``[N, V, H]`` GEMMs (``linear_logprobs``, whose upstream gradient is unknown in its forward,
needs a fourth to recompute the logits), at the memory of one chunk of logits. Loss types whose token
gradient needs a sequence-level quantity first (gspo's sequence ratio) take one more pass over the tokens
before it (``linear_logprobs``' forward: one GEMM per chunk), so four GEMMs.

Registered as ``fastrlhf::linear_policy_loss_forward`` with a fake implementation and autograd, so it runs
under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference
from fastrlhf.ops.linear_logprobs import _chunk_logits, canonical_linear, chunk_grads, chunking
from fastrlhf.ops.logprobs_local import acc_dtype, backward_into, forward_local, kept_upstream
from fastrlhf.ops.policy_loss import (METRICS, Options, Plan, finish_policy_loss, make_options, plan_policy_loss,
                                      policy_loss_tokens)
from fastrlhf.ops.policy_loss import _canonical as _canonical_tokens
from fastrlhf.ops.sampling_threshold import threshold_into


def linear_policy_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
                       mask: Optional[Tensor] = None, *, bias: Optional[Tensor] = None,
                       temperature: float | Tensor = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                       return_logp: bool = False, loss_type: str = "ppo", clip_low: Optional[float] = 0.2,
                       clip_high: float = 0.2, dual_clip: Optional[float] = None, sapo_tau_pos: float = 1.0,
                       sapo_tau_neg: float = 1.05, ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                       kl_estimator: str = "k3", entropy_coef: float = 0.0,
                       rollout_is_weights: Optional[Tensor] = None, aggregation: str = "token-mean",
                       kl_aggregation: Optional[str] = None, entropy_aggregation: Optional[str] = None,
                       num_tokens: float | Tensor | None = None, num_sequences: float | Tensor | None = None,
                       horizon: Optional[float] = None, cu_seqlens: Optional[Tensor] = None, top_k=None, top_p=None,
                       min_p=None):
    """``fastrlhf.policy_loss(linear_logprobs(hidden, weight, labels, ...), old_logp, advantages, mask, ...)``
    without the ``[tokens, V]`` logits, its gradients formed during the forward.

    Args:
        hidden: ``[B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens``) fp32, bf16, fp16 or fp64: the policy's
            last hidden states.
        weight: ``[V, H]``, hidden's dtype (the lm_head; it may be tied to the input embedding).
        labels: ``[B, T]`` (``[N]``) int64/int32: the sampled tokens, ``ignore_index`` where none is scored.
        old_logp, advantages, ref_logp, rollout_is_weights: as in ``fastrlhf.policy_loss`` (any float dtype;
            used in fp32, fp64 for fp64 hidden); data, never differentiated.
        mask: ``[B, T]`` bool or 0/1; None: every token whose label is not ``ignore_index`` (a given mask is
            also cleared there).
        bias: ``[V]`` or None. temperature: a float or a tensor broadcastable to ``labels`` (not differentiated).
        chunk_size: tokens per chunk; None picks ``linear_logprobs``' forward chunk (``chunking``). Results do
            not depend on it beyond rounding.
        return_logp: also return the detached per-token log-probs (``[B, T]`` fp32, fp64 for fp64; 0 at
            ``ignore_index``), e.g. the next step's ``old_logp``.
        top_k, top_p, min_p: the sampler's filters, as in ``fastrlhf.linear_logprobs``: the log-probs (and
            entropy) are those of the kept distribution, each chunk's thresholds found from its logits. A scored
            token whose label falls outside the kept set has log-prob ``-inf`` (``return_logp`` shows it) and
            no gradient; its loss terms are what ``policy_loss`` makes of ``-inf`` (finite for ppo without KL,
            infinite with a KL term): mask such tokens.
        Every other keyword is ``fastrlhf.policy_loss``'s (loss types, KL, IS weights, aggregation with global
        counts); the entropy term (``entropy_coef != 0``) uses the entropy of the same logits.

    Returns:
        ``(loss, metrics)`` or ``(loss, metrics, logp)``, as ``fastrlhf.policy_loss``.

    Gradients reach hidden, weight (accumulated over chunks in fp32, fp64 for fp64, cast once at the end: for
    bf16/fp16 that is one ``[V, H]`` fp32 buffer, twice the weight's own gradient) and bias. They are computed
    during the forward whenever one of them requires a gradient and grad mode is on; otherwise (e.g. under
    ``torch.no_grad()`` to score the next step's ``old_logp``) the forward is one GEMM per chunk. The backward
    scales the gradients in place by the incoming gradient (no second copy of the weight's gradient); a second
    backward through the same graph recomputes them.
    gspo takes two passes over the tokens (four GEMMs), the other loss types one (three GEMMs).
    """
    if backend.forced_backend() == "reference":
        return reference.linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias=bias, temperature=temperature,
            ignore_index=ignore_index, return_logp=return_logp, loss_type=loss_type, clip_low=clip_low,
            clip_high=clip_high, dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
            ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
            rollout_is_weights=rollout_is_weights, aggregation=aggregation, kl_aggregation=kl_aggregation,
            entropy_aggregation=entropy_aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
            horizon=horizon, cu_seqlens=cu_seqlens, top_k=top_k, top_p=top_p, min_p=min_p)
    flat_hidden, flat_labels, inv_temp, filters = canonical_linear(hidden, weight, bias, labels, temperature,
                                                                   ignore_index, top_k, top_p, min_p)
    vocab = weight.shape[0]
    acc = acc_dtype(hidden)
    scored = labels != ignore_index
    if mask is not None:
        checks.tensor("mask", mask)
        checks.shape("mask", mask, labels.shape)
        checks.device("mask", mask, labels.device)
        scored = scored & (mask != 0)
    # The per-token inputs are checked against the log-probs the op will compute: labels' shape, fp32 (fp64).
    logp_like = flat_hidden.new_empty(labels.shape, dtype=acc)
    tokens = _canonical_tokens(logp_like, *(_as(acc, name, t) for name, t in (
        ("old_logp", old_logp), ("advantages", advantages))), scored, _as(acc, "ref_logp", ref_logp), None,
        _as(acc, "rollout_is_weights", rollout_is_weights), cu_seqlens)
    _, flat_old, flat_adv, flat_mask, flat_ref, _, flat_isw, offsets = tokens
    options = make_options(loss_type, clip_low, clip_high, dual_clip, sapo_tau_pos, sapo_tau_neg,
                           kl_coef if flat_ref is not None else 0.0, kl_estimator, entropy_coef)
    if options.kl_coef == 0:
        flat_ref = None
    if horizon is None:
        if cu_seqlens is not None and "seq-mean-token-sum-norm" in (aggregation, kl_aggregation, entropy_aggregation):
            raise ValueError("horizon: required with cu_seqlens for aggregation 'seq-mean-token-sum-norm'")
        horizon = labels.shape[-1] if cu_seqlens is None else 1
    chunk, width = chunking(chunk_size, flat_hidden.shape[0], vocab, flat_hidden.shape[1], hidden.device)
    flat_logp = logp_like.view(-1)
    if loss_type == "gspo":
        # The sequence ratio needs every token's log-prob before any token's gradient: one more pass.
        flat_logp = torch.ops.fastrlhf.linear_logprobs_forward(flat_hidden.detach(), weight.detach(), None if bias
                                                               is None else bias.detach(), flat_labels, inv_temp,
                                                               *filters, ignore_index, chunk, width)[0]
    per_sequence = tuple(advantages.shape) != tuple(labels.shape)
    plan = plan_policy_loss(flat_logp, flat_old, flat_mask, offsets, labels.shape[1] if cu_seqlens is None else 0,
                            options, per_sequence,
                            (aggregation, kl_aggregation or aggregation, entropy_aggregation or aggregation),
                            num_tokens, num_sequences, horizon)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, metrics, logp, *_ = torch.ops.fastrlhf.linear_policy_loss_forward(
        flat_hidden, weight, bias, flat_labels, inv_temp, *filters, flat_old, flat_adv, flat_mask, flat_ref, flat_isw,
        plan.offsets, plan.row_length, plan.advantages_per_sequence, plan.seq_weights, plan.seq_log_ratio, *plan.options,
        ignore_index, chunk, needs)
    metrics = {name: metrics[k] for k, name in enumerate(METRICS)}
    return (loss, metrics, logp.view(labels.shape)) if return_logp else (loss, metrics)


def _as(acc, name, value):
    """A per-token float tensor (or None) in the log-probs' compute dtype, detached."""
    if value is None:
        return None
    checks.dtype(name, value, checks.FLOATS)
    return value.detach().to(acc)


def _forward(hidden, weight, bias, labels, inv_temp, top_k, top_p, min_p, old_logp, advantages, mask, ref_logp,
             is_weights, offsets, row_length, advantages_per_sequence, seq_weights, seq_log_ratio, options: Options,
             ignore_index, chunk_size, needs_grad):
    need_hidden, need_weight, need_bias = needs_grad
    want_grads = any(needs_grad)
    acc = acc_dtype(hidden)
    tokens, vocab = hidden.shape[0], weight.shape[0]
    plan = Plan(offsets, row_length, seq_weights, seq_log_ratio, advantages_per_sequence, options)
    logp = backend.empty_outputs(hidden.new_empty(tokens, dtype=acc), 1)[0]
    grad_hidden = backend.empty_outputs(hidden, 1)[0] if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape if need_weight else 0, dtype=acc, device=weight.device)
    grad_bias = torch.zeros(vocab if need_bias else 0, dtype=acc, device=weight.device)
    with_entropy = options.entropy_coef != 0
    partials = []
    chunk_threshold = None if top_k is None else hidden.new_empty(min(chunk_size, tokens), dtype=acc)
    for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size):
        part_labels, part_inv_temp = labels[rows], inv_temp[rows]
        threshold = None
        if top_k is not None:
            threshold = chunk_threshold[: logits.shape[0]]
            threshold_into(logits, part_inv_temp, top_k[rows], top_p[rows], min_p[rows], threshold)
        logp[rows], entropy, lse = forward_local(logits, part_labels, part_inv_temp, threshold, ignore_index, 0,
                                                 vocab)
        entropy = entropy if with_entropy else None
        grad_logp, grad_entropy, part = policy_loss_tokens(
            logp[rows], old_logp[rows], advantages if advantages_per_sequence else advantages[rows], mask[rows],
            None if ref_logp is None else ref_logp[rows], entropy, None if is_weights is None else is_weights[rows],
            plan, first=rows.start, write_grads=want_grads)
        partials.append(part)
        if not want_grads:
            continue
        # The buffer becomes G = d loss / d logits (logits' dtype), then three products with it.
        grad_logp, grad_entropy = (kept_upstream(g, logp[rows], threshold) for g in (grad_logp, grad_entropy))
        backward_into(logits, logits, part_labels, part_inv_temp, threshold, lse, entropy, grad_logp, grad_entropy,
                      ignore_index, 0, vocab)
        chunk_grads(logits, hidden, weight, rows, grad_hidden, grad_weight, grad_bias, needs_grad)
    loss, metrics = finish_policy_loss(torch.cat(partials), options)
    return loss, metrics, logp, grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@torch.library.custom_op("fastrlhf::linear_policy_loss_forward", mutates_args=())
def linear_policy_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                               inv_temp: Tensor, top_k: Optional[Tensor], top_p: Optional[Tensor],
                               min_p: Optional[Tensor], old_logp: Tensor, advantages: Tensor, mask: Tensor,
                               ref_logp: Optional[Tensor], is_weights: Optional[Tensor], offsets: Tensor,
                               row_length: int, advantages_per_sequence: bool, seq_weights: Tensor, seq_log_ratio: Optional[Tensor],
                               loss_type: int, lower: float, upper: float, dual_clip: float, tau_pos: float,
                               tau_neg: float, kl_estimator: int, kl_straight: bool, kl_coef: float,
                               entropy_coef: float, ignore_index: int, chunk_size: int,
                               needs_grad: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat ``[N, H]`` hidden states, ``[N]`` per-token inputs (``top_k``, ``top_p``, ``min_p``: the sampler's
    filters, all three or none) and a policy-loss plan (``Plan``, ``Options``).

    Returns the 0-d loss, the fp32 metrics, the ``[N]`` log-probs and the gradients of the loss with respect
    to hidden ``[N, H]``, weight ``[V, H]`` and bias ``[V]`` (each ``[0]`` when not in ``needs_grad``)."""
    return _forward(hidden, weight, bias, labels, inv_temp, top_k, top_p, min_p, old_logp, advantages, mask, ref_logp,
                    is_weights, offsets, row_length, advantages_per_sequence, seq_weights, seq_log_ratio,
                    Options(loss_type, lower, upper, dual_clip, tau_pos, tau_neg, kl_estimator, kl_straight, kl_coef,
                            entropy_coef), ignore_index, chunk_size, needs_grad)


@linear_policy_loss_forward.register_fake
def _(hidden, weight, bias, labels, inv_temp, *rest):
    need_hidden, need_weight, need_bias = rest[-1]
    acc = acc_dtype(hidden)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(len(METRICS), dtype=torch.float32),
            hidden.new_empty(hidden.shape[0], dtype=acc), torch.empty_like(hidden) if need_hidden
            else hidden.new_empty(0), torch.empty_like(weight) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0] if need_bias else 0))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    # The gradients formed in the forward are handed to the first backward, which scales them in place (a
    # fresh product would hold a second [V, H] weight gradient at its peak). Held on ctx, not saved: they are
    # non-differentiable outputs (no reference cycle), and after the hand-over autograd may accumulate into
    # them. A later backward through the same graph (retain_graph=True, gradcheck) recomputes them from the
    # saved inputs instead.
    ctx.grads = output[3:]
    ctx.save_for_backward(*(x for x in inputs if isinstance(x, Tensor)))
    ctx.layout = [_SAVED if isinstance(x, Tensor) else x for x in inputs]


_SAVED = object()


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("linear_policy_loss has no double backward: call backward without create_graph=True")
    if ctx.grads is None:
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if x is _SAVED else x for x in ctx.layout]
        ctx.grads = torch.ops.fastrlhf.linear_policy_loss_forward(*inputs)[3:]
    grads, ctx.grads = ctx.grads, None
    needs_grad = ctx.layout[-1]
    return (*(g.mul_(grad_loss) if need else None for g, need in zip(grads, needs_grad)), *([None] * 28))


linear_policy_loss_forward.register_autograd(_backward, setup_context=_setup_context)
