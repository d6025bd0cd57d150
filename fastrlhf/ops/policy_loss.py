"""``fastrlhf.policy_loss``: the policy-gradient loss of PPO, GSPO, CISPO, SAPO and REINFORCE as one fused op.

Every aggregation is a weighted sum over tokens whose weight is constant along a sequence, known before
the loss: token-mean ``1 / num_tokens``, token-sum 1, seq-mean-token-sum ``1 / num_sequences``,
seq-mean-token-mean ``1 / (num_sequences * len_s)``, seq-mean-token-sum-norm ``1 / (num_sequences *
horizon)``; fully masked sequences weigh 0. So the op runs in three steps, none of which syncs with the host:

1. ``plan_policy_loss``: one pass over the mask per sequence (``policy_loss_sequences`` kernel: token
   counts, and for gspo the mean clamped log-ratio, i.e. the sequence ratio), then a few ``[S]`` torch ops
   that make ``seq_weights [3, S]``: the per-sequence weights of the policy, KL and entropy terms.
2. ``policy_loss_tokens``: ONE kernel pass over any contiguous slice of tokens that reads the log-probs,
   advantages, mask, reference log-probs, entropy and IS weights and writes each token's gradient
   ``d loss / d logp`` and ``d loss / d entropy`` (scaled by an optional 0-d ``grad_scale``) and per-block
   partial sums of the loss terms and metrics (``PARTIALS``). It is the building block of
   ``linear_policy_loss``, which calls it on chunks of tokens.
3. ``finish_policy_loss``: combines the partial sums of any number of slices in a fixed order into the loss
   and the ``[len(METRICS)]`` fp32 metrics tensor.

The forward runs step 2 without writing gradients; the backward runs it again with the incoming gradient
as ``grad_scale`` and writes the two gradients directly (a recompute). So fwd + bwd needs no memory beyond
the two gradients autograd must return (peak extra: two ``[B, T]`` tensors), where saving the gradients in
the forward would hold four at once in the backward. The recompute re-reads the inputs (~21 B/token fp32)
instead of writing and re-reading two saved gradients (~16 B/token): about the same traffic.

Registered as ``fastrlhf::policy_loss_forward`` / ``fastrlhf::policy_loss_backward`` with fake
implementations and autograd, so it runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference

# Codes shared with csrc/policy_loss.cpp and fastrlhf/kernels/policy_loss.py.
LOSS_TYPES = ("ppo", "gspo", "cispo", "sapo", "reinforce")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
PARTIALS = ("policy_loss", "kl", "entropy", "tokens", "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac",
            "ppo_kl", "approx_kl", "ratio_sum", "ratio_min", "ratio_max")
METRICS = ("policy_loss", "kl", "entropy", "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "ppo_kl",
           "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
FLOAT_INPUTS = ("old_logp", "ref_logp", "entropy", "rollout_is_weights")


class Options(NamedTuple):
    """The scalar options of the token kernel, as the C++ op and the Triton launcher take them."""

    loss_type: int
    lower: float          # 1 - clip_low, or -inf: no lower bound
    upper: float          # 1 + clip_high
    dual_clip: float      # 0: none
    tau_pos: float
    tau_neg: float
    kl_estimator: int
    kl_straight: bool     # "+": the estimator's value with the gradient of k2
    kl_coef: float        # 0 when the KL term is off
    entropy_coef: float   # 0 when the entropy term is off


class Plan(NamedTuple):
    """What the token pass needs besides the per-token tensors (step 1's result; all on the tokens' device).

    ``offsets`` int64 ``[S + 1]`` cut the flat tokens into sequences (``s * row_length`` when
    ``row_length > 0``); ``seq_weights`` ``[3, S]`` (fp32, fp64
    for fp64) are the weights of the policy, KL and entropy terms of each sequence's tokens;
    ``seq_log_ratio`` ``[S]`` the mean clamped log-ratio of each sequence (gspo only, else None).
    """

    offsets: Tensor
    row_length: int       # T for padded [B, T] input (offsets are s * T), 0 for packed
    seq_weights: Tensor
    seq_log_ratio: Optional[Tensor]
    advantages_per_sequence: bool
    options: Options


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor] = None, *,
                loss_type: str = "ppo", clip_low: Optional[float] = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                rollout_is_weights: Optional[Tensor] = None, aggregation: str = "token-mean",
                kl_aggregation: Optional[str] = None, entropy_aggregation: Optional[str] = None,
                num_tokens: float | Tensor | None = None, num_sequences: float | Tensor | None = None,
                horizon: Optional[float] = None, cu_seqlens: Optional[Tensor] = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy-gradient loss and its metrics, one fused pass over the tokens, no host sync.

    Args:
        logp: ``[B, T]`` (or packed ``[N]`` with ``cu_seqlens``) log-probs of the sampled tokens under the
            current policy, fp32, bf16, fp16 or fp64; differentiable.
        old_logp, ref_logp, rollout_is_weights: like ``logp`` (same dtype), data (never differentiated).
        advantages: like ``logp``, or ``[B]`` / ``[S]`` (one per sequence), same dtype.
        mask: like ``logp``, bool or 0/1. Masked tokens are never read into any result: NaN or inf there
            changes nothing.
        loss_type: per token, with ``log r = clamp(logp - old_logp, -20, 20)``, ``r = exp(log r)``:
            ``"ppo"`` ``max(-A r, -A clip(r))``, and with ``dual_clip`` c, ``min(that, -c A)`` where A < 0
            (verl's ``vanilla``); ``"gspo"`` the sequence ratio ``s = exp(masked mean of log r)`` in the
            token form ``log s_t = sg(log s) + logp - sg(logp)`` clamped above at 10, clipped as ppo without
            dual clip; ``"cispo"`` ``-sg(clip(r)) A logp``; ``"sapo"`` ``-A sigmoid(tau (r - 1)) 4 / tau``
            with ``tau = sapo_tau_pos`` where A > 0, else ``sapo_tau_neg``; ``"reinforce"`` ``-A logp``.
            ``clip(r)`` keeps r in ``[1 - clip_low, 1 + clip_high]``; ``clip_low=None``: no lower bound.
            The token's loss is multiplied by ``rollout_is_weights`` when given.
        ref_logp, kl_coef, kl_estimator: the KL term (on when ``ref_logp`` is given and ``kl_coef != 0``),
            verl's ``kl_penalty``: ``"k1"`` ``logp - ref``, ``"abs"``, ``"k2"`` ``(logp - ref)^2 / 2``,
            ``"k3"`` ``exp(ref - logp) - (ref - logp) - 1`` (``ref - logp`` clamped to +-20, the result to
            +-10); a ``"+"`` suffix keeps the value with the gradient of k2 (straight-through).
        entropy, entropy_coef: per-token entropy (differentiable) and its bonus (on when both are given).
        aggregation: ``"token-mean"`` (sum / ``num_tokens``), ``"token-sum"``, ``"seq-mean-token-sum"``,
            ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"`` (each sequence's token sum divided by
            ``horizon``, default T, required for packed input); the ``seq-*`` forms sum over sequences and
            divide by ``num_sequences``; fully masked sequences do not count. ``kl_aggregation`` and
            ``entropy_aggregation`` default to ``aggregation``.
        num_tokens, num_sequences: the denominators; default this call's unmasked tokens and non-empty
            sequences. Pass the global counts (divided by the data-parallel world size where DDP averages
            gradients) to make micro-batches and ranks add up to one batch. Python numbers or 0-d tensors.
        cu_seqlens: int32/int64 ``[S + 1]`` offsets of packed sequences in ``[N]`` inputs.

    Returns:
        ``(loss, metrics)``: ``loss = policy + kl_coef * kl - entropy_coef * entropy``, 0-d fp32 (fp64 for
        fp64); ``metrics``: detached 0-d fp32 views of one device tensor: ``policy_loss``, ``kl``, ``entropy``
        (the aggregated terms, 0 where a term is off), and token means over this call's unmasked tokens (0
        when there are none): ``clipfrac`` (ppo, gspo: the clipped term is the larger; cispo: the ratio is
        outside the range; sapo, reinforce: 0), ``clipfrac_low`` (``r < 1 - clip_low`` with A < 0) and
        ``clipfrac_high`` (``r > 1 + clip_high`` with A > 0) (ppo, gspo, cispo), ``dual_clipfrac`` (verl's
        ``pg_clipfrac_lower``), ``ppo_kl`` (mean ``-log r``), ``approx_kl`` (k3 of ``old_logp`` against
        ``logp``, clamped as ``"k3"``), ``ratio_mean``, ``ratio_min``, ``ratio_max`` (gspo: the sequence ratio
        of each token; min and max ignore NaN). Arithmetic is fp32 (fp64 for fp64); gradients reach
        ``logp`` and ``entropy`` in their dtype.
    """
    if backend.forced_backend() == "reference":
        return reference.policy_loss(
            logp, old_logp, advantages, mask, loss_type=loss_type, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, ref_logp=ref_logp,
            kl_coef=kl_coef, kl_estimator=kl_estimator, entropy=entropy, entropy_coef=entropy_coef,
            rollout_is_weights=rollout_is_weights, aggregation=aggregation, kl_aggregation=kl_aggregation,
            entropy_aggregation=entropy_aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
            horizon=horizon, cu_seqlens=cu_seqlens)
    tensors = _canonical(logp, old_logp, advantages, mask, ref_logp, entropy, rollout_is_weights, cu_seqlens)
    flat_logp, flat_old, flat_adv, flat_mask, flat_ref, flat_ent, flat_isw, offsets = tensors
    options = make_options(loss_type, clip_low, clip_high, dual_clip, sapo_tau_pos, sapo_tau_neg,
                           kl_coef if flat_ref is not None else 0.0, kl_estimator,
                           entropy_coef if flat_ent is not None else 0.0)
    if horizon is None:
        if cu_seqlens is not None and "seq-mean-token-sum-norm" in (aggregation, kl_aggregation, entropy_aggregation):
            raise ValueError("horizon: required with cu_seqlens for aggregation 'seq-mean-token-sum-norm'")
        horizon = logp.shape[-1] if cu_seqlens is None else 1
    per_sequence = tuple(advantages.shape) != tuple(logp.shape)
    plan = plan_policy_loss(flat_logp, flat_old, flat_mask, offsets, logp.shape[1] if cu_seqlens is None else 0,
                            options, per_sequence,
                            (aggregation, kl_aggregation or aggregation, entropy_aggregation or aggregation),
                            num_tokens, num_sequences, horizon)
    if options.kl_coef == 0:
        flat_ref = None
    if options.entropy_coef == 0:
        flat_ent = None
    args = (flat_logp, flat_old, flat_adv, flat_mask, flat_ref, flat_ent, flat_isw, plan.offsets, plan.row_length,
            plan.advantages_per_sequence, plan.seq_weights, plan.seq_log_ratio, *plan.options)
    differentiable = torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (flat_logp, flat_ent)))
    if differentiable:
        loss, metrics = torch.ops.fastrlhf.policy_loss_forward(*args)
    else:
        loss, metrics = _forward(*args)
    return loss, {name: metrics[k] for k, name in enumerate(METRICS)}


def make_options(loss_type: str, clip_low, clip_high, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator,
                 entropy_coef) -> Options:
    """Checks the scalar options; returns them in the kernels' form."""
    checks.one_of("loss_type", loss_type, LOSS_TYPES)
    estimator = kl_estimator.removesuffix("+") if isinstance(kl_estimator, str) else kl_estimator
    checks.one_of("kl_estimator", estimator, KL_ESTIMATORS + tuple(e + "+" for e in KL_ESTIMATORS))
    if clip_low is not None and not float(clip_low) >= 0:
        raise ValueError(f"clip_low: expected a value >= 0 or None, got {clip_low}")
    if not float(clip_high) >= 0:
        raise ValueError(f"clip_high: expected a value >= 0, got {clip_high}")
    if dual_clip is not None:
        if not float(dual_clip) > 1:
            raise ValueError(f"dual_clip: expected a value > 1 or None, got {dual_clip}")
        if loss_type != "ppo":
            raise ValueError(f"dual_clip: applies to loss_type='ppo' only, got loss_type={loss_type!r}")
    for name, tau in (("sapo_tau_pos", tau_pos), ("sapo_tau_neg", tau_neg)):
        if not 0 < float(tau) < float("inf"):
            raise ValueError(f"{name}: expected a positive finite value, got {tau}")
    for name, coef in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if isinstance(coef, Tensor) or not abs(float(coef)) < float("inf"):
            raise ValueError(f"{name}: expected a finite Python number, got {coef!r}")
    return Options(LOSS_TYPES.index(loss_type), -float("inf") if clip_low is None else 1.0 - float(clip_low),
                   1.0 + float(clip_high), 0.0 if dual_clip is None else float(dual_clip), float(tau_pos),
                   float(tau_neg), KL_ESTIMATORS.index(estimator), kl_estimator.endswith("+"), float(kl_coef),
                   float(entropy_coef))


def _canonical(logp, old_logp, advantages, mask, ref_logp, entropy, rollout_is_weights, cu_seqlens):
    """Checks the tensors; returns them flat ``[N]`` (advantages ``[N]`` or ``[S]``) with the offsets."""
    offsets = sequence_offsets("logp", logp, cu_seqlens)
    rows = offsets.numel() - 1
    named = dict(zip(FLOAT_INPUTS, (old_logp, ref_logp, entropy, rollout_is_weights)))
    flat = {}
    for name, t in named.items():
        if t is None:
            flat[name] = None
            continue
        checks.dtype(name, t, (logp.dtype,))
        checks.shape(name, t, logp.shape)
        checks.device(name, t, logp.device)
        flat[name] = (t if name == "entropy" else t.detach()).contiguous().view(-1)
    if old_logp is None:
        raise TypeError("old_logp: expected a torch.Tensor, got None")
    checks.dtype("advantages", advantages, (logp.dtype,))
    checks.device("advantages", advantages, logp.device)
    if tuple(advantages.shape) not in (tuple(logp.shape), (rows,)):
        raise ValueError(f"advantages: expected shape {tuple(logp.shape)} or ({rows},), got {tuple(advantages.shape)}")
    flat_mask = None
    if mask is not None:
        checks.tensor("mask", mask)
        checks.shape("mask", mask, logp.shape)
        checks.device("mask", mask, logp.device)
        if mask.is_complex():
            raise TypeError(f"mask: expected bool or 0/1 numbers, got {mask.dtype}")
        flat_mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(-1)
    return (logp.contiguous().view(-1), flat["old_logp"], advantages.detach().contiguous().view(-1), flat_mask,
            flat["ref_logp"], flat["entropy"], flat["rollout_is_weights"], offsets)


def sequence_offsets(name: str, tokens: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    """int64 ``[S + 1]`` offsets of the sequences of float ``tokens``: ``s * T`` for ``[B, T]`` input, the
    checked ``cu_seqlens`` for packed ``[N]`` input. At least one sequence; no host sync."""
    checks.dtype(name, tokens, checks.FLOATS)
    if cu_seqlens is None:
        checks.ndim(name, tokens, (2,))
        rows, length = tokens.shape
        offsets = torch.arange(0, (rows + 1) * length, max(length, 1), device=tokens.device)[: rows + 1]
        if length == 0:
            offsets = torch.zeros(rows + 1, dtype=torch.int64, device=tokens.device)
    else:
        checks.ndim(f"{name} (packed, with cu_seqlens)", tokens, (1,))
        offsets = checks.offsets(cu_seqlens, tokens)
        rows = offsets.numel() - 1
    if rows == 0:
        raise ValueError(f"{name}: expected at least one sequence, got shape {tuple(tokens.shape)}")
    return offsets


def _count(name, value, acc, device):
    """A count: a 0-d tensor on ``device`` (never read on the host there), or a positive Python float (kept
    a Python number: making a device tensor of it would be a blocking host-to-device copy)."""
    if isinstance(value, Tensor):
        checks.device(name, value, device)
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a 0-d tensor or a number, got shape {tuple(value.shape)}")
        if checks.values_checked(value) and not float(value) > 0:
            raise ValueError(f"{name}: expected a positive count, got {float(value)}")
        return value.detach().reshape(()).to(acc)
    if not 0 < float(value) < float("inf"):
        raise ValueError(f"{name}: expected a positive count, got {value}")
    return float(value)


def plan_policy_loss(logp: Tensor, old_logp: Tensor, mask: Optional[Tensor], offsets: Tensor, row_length: int,
                     options: Options, advantages_per_sequence: bool, aggregations: tuple[str, str, str],
                     num_tokens=None, num_sequences=None, horizon: float = 1.0) -> Plan:
    """Step 1: per-sequence counts (and the gspo sequence ratio), then the ``[3, S]`` term weights.

    ``logp``, ``old_logp``, ``mask``: flat ``[N]`` (``logp`` is read only for gspo, detached); ``offsets``
    and ``row_length`` as in ``Plan``;
    ``aggregations``: of the policy, KL and entropy terms. Sync-free: counts stay on the device.
    """
    for name, agg in zip(("aggregation", "kl_aggregation", "entropy_aggregation"), aggregations):
        checks.one_of(name, agg, AGGREGATIONS)
    if not 0 < float(horizon) < float("inf"):
        raise ValueError(f"horizon: expected a positive number, got {horizon}")
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    gspo = options.loss_type == LOSS_TYPES.index("gspo")
    counts, seq_log_ratio = torch.ops.fastrlhf.policy_loss_sequences(logp.detach(), old_logp.detach(), mask, offsets,
                                                                     gspo)
    seq_log_ratio = seq_log_ratio if gspo else None
    valid = (counts > 0).to(acc)
    tokens = counts.sum() if num_tokens is None else _count("num_tokens", num_tokens, acc, logp.device)
    sequences = valid.sum() if num_sequences is None else _count("num_sequences", num_sequences, acc, logp.device)

    def weights(agg):
        if agg == "token-mean":
            return valid / tokens
        if agg == "token-sum":
            return valid
        if agg == "seq-mean-token-sum":
            return valid / sequences
        if agg == "seq-mean-token-mean":
            return valid / (sequences * counts.clamp(min=1))
        return valid / (sequences * float(horizon))

    seq_weights = torch.stack([weights(agg) for agg in aggregations]).contiguous()
    return Plan(offsets, row_length, seq_weights, seq_log_ratio, advantages_per_sequence, options)


@torch.library.custom_op("fastrlhf::policy_loss_sequences", mutates_args=())
def policy_loss_sequences(logp: Tensor, old_logp: Tensor, mask: Optional[Tensor], offsets: Tensor,
                          with_log_ratio: bool) -> tuple[Tensor, Tensor]:
    """Per sequence: the unmasked tokens (``[S]``, fp32, fp64 for fp64) and, with ``with_log_ratio``, the
    mean clamped log-ratio (``[S]``; else ``[0]``)."""
    counts = backend.empty_outputs(_sequence_stats_like(logp, offsets), 1)[0]
    seq_log_ratio = backend.empty_outputs(counts, 1)[0] if with_log_ratio else counts.new_empty(0)
    backend.kernels("policy_loss", logp).policy_loss_sequences(
        logp if with_log_ratio else None, old_logp if with_log_ratio else None, mask, offsets, logp.numel(), counts,
        seq_log_ratio if with_log_ratio else None)
    return counts, seq_log_ratio


@policy_loss_sequences.register_fake
def _(logp, old_logp, mask, offsets, with_log_ratio):
    counts = _sequence_stats_like(logp, offsets)
    return counts, counts.new_empty(offsets.shape[0] - 1 if with_log_ratio else 0)


def _sequence_stats_like(logp, offsets):
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return logp.new_empty(offsets.shape[0] - 1, dtype=acc)


def policy_loss_tokens(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor],
                       ref_logp: Optional[Tensor], entropy: Optional[Tensor], is_weights: Optional[Tensor],
                       plan: Plan, first: int = 0, grad_scale: Optional[Tensor] = None, write_grads: bool = True
                       ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """Step 2 on a slice: tokens ``[first, first + n)`` of the sequences in ``plan.offsets``.

    Args:
        logp, old_logp: ``[n]`` (one dtype); ``advantages`` ``[n]``, or the full ``[S]`` when
            ``plan.advantages_per_sequence``; ``mask`` bool ``[n]``; ``ref_logp``, ``entropy``,
            ``is_weights``: ``[n]`` or None (pass None where the term is off, as ``policy_loss`` does).
        grad_scale: a 0-d tensor (fp32, fp64 for fp64) multiplied into both gradients, e.g. the incoming
            gradient of the loss; None: 1.
        write_grads: False skips the gradient writes (loss and metrics only).

    Returns ``(grad_logp [n] | None, grad_entropy [n] | None, partials [K, len(PARTIALS)])``: each token's
    ``d loss / d logp`` and ``d loss / d entropy`` (0 at masked tokens; ``grad_entropy`` None without
    ``entropy``) and the partial sums (fp32, fp64 for fp64) that ``finish_policy_loss`` turns into the loss
    and metrics; partial sums of several slices may be concatenated first.
    """
    grad_logp = backend.empty_outputs(logp, 1)[0] if write_grads else None
    grad_entropy = backend.empty_outputs(entropy, 1)[0] if write_grads and entropy is not None else None
    partials = _empty_partials(logp)
    backend.kernels("policy_loss", logp).policy_loss_tokens(
        logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, plan.offsets, plan.row_length, first,
        plan.advantages_per_sequence, plan.seq_weights, plan.seq_log_ratio, grad_scale, *plan.options, grad_logp,
        grad_entropy, partials)
    return grad_logp, grad_entropy, partials


def finish_policy_loss(partials: Tensor, options: Options) -> tuple[Tensor, Tensor]:
    """Step 3: the loss (0-d, the partials' dtype) and the ``[len(METRICS)]`` fp32 metrics of ``[K, P]``
    partial sums, combined in a fixed order."""
    loss = backend.empty_outputs(partials.new_empty(()), 1)[0]
    metrics = backend.empty_outputs(partials.new_empty(len(METRICS), dtype=torch.float32), 1)[0]
    backend.kernels("policy_loss", partials).policy_loss_finish(partials, options.kl_coef, options.entropy_coef,
                                                                loss, metrics)
    return loss, metrics


# Tokens per row of partial sums: fixed per backend (csrc/policy_loss.cpp BLOCK_TOKENS), so results do not
# depend on the number of threads.
CPP_BLOCK_TOKENS = 1 << 15


def _empty_partials(logp):
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    if backend.backend_for(logp) == "cpp":
        block = CPP_BLOCK_TOKENS
    else:
        block = backend.triton_kernels("policy_loss", logp.device).BLOCK_TOKENS
    rows = -(-logp.numel() // block)
    return backend.empty_outputs(logp.new_empty((rows, len(PARTIALS)), dtype=acc), 1)[0]


def _forward(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, offsets, row_length,
             advantages_per_sequence, seq_weights, seq_log_ratio, *options):
    plan = Plan(offsets, row_length, seq_weights, seq_log_ratio, advantages_per_sequence, Options(*options))
    _, _, partials = policy_loss_tokens(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, plan,
                                        write_grads=False)
    return finish_policy_loss(partials, plan.options)


@torch.library.custom_op("fastrlhf::policy_loss_forward", mutates_args=())
def policy_loss_forward(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor],
                        ref_logp: Optional[Tensor], entropy: Optional[Tensor], is_weights: Optional[Tensor],
                        offsets: Tensor, row_length: int, advantages_per_sequence: bool, seq_weights: Tensor,
                        seq_log_ratio: Optional[Tensor], loss_type: int, lower: float, upper: float, dual_clip: float,
                        tau_pos: float, tau_neg: float, kl_estimator: int, kl_straight: bool, kl_coef: float,
                        entropy_coef: float) -> tuple[Tensor, Tensor]:
    """Flat inputs and a plan (see ``Plan``, ``Options``); returns the 0-d loss and the fp32 metrics."""
    return _forward(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, offsets, row_length,
                    advantages_per_sequence, seq_weights, seq_log_ratio, loss_type, lower, upper, dual_clip, tau_pos,
                    tau_neg, kl_estimator, kl_straight, kl_coef, entropy_coef)


@policy_loss_forward.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, offsets, *rest):
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return logp.new_empty((), dtype=acc), logp.new_empty(len(METRICS), dtype=torch.float32)


@torch.library.custom_op("fastrlhf::policy_loss_backward", mutates_args=())
def policy_loss_backward(grad_loss: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                         mask: Optional[Tensor], ref_logp: Optional[Tensor], entropy: Optional[Tensor],
                         is_weights: Optional[Tensor], offsets: Tensor, row_length: int,
                         advantages_per_sequence: bool,
                         seq_weights: Tensor, seq_log_ratio: Optional[Tensor], loss_type: int, lower: float,
                         upper: float, dual_clip: float, tau_pos: float, tau_neg: float, kl_estimator: int,
                         kl_straight: bool, kl_coef: float, entropy_coef: float) -> tuple[Tensor, Tensor]:
    """The gradients of ``logp`` and ``entropy`` (``[0]`` without entropy), recomputed in one token pass and
    scaled by ``grad_loss``."""
    plan = Plan(offsets, row_length, seq_weights, seq_log_ratio, advantages_per_sequence,
                Options(loss_type, lower, upper, dual_clip, tau_pos, tau_neg, kl_estimator, kl_straight, kl_coef,
                        entropy_coef))
    grad_logp, grad_entropy, _ = policy_loss_tokens(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                    is_weights, plan, grad_scale=grad_loss.contiguous())
    return grad_logp, logp.new_zeros(0) if grad_entropy is None else grad_entropy


@policy_loss_backward.register_fake
def _(grad_loss, logp, old_logp, advantages, mask, ref_logp, entropy, *rest):
    return torch.empty_like(logp), logp.new_empty(0) if entropy is None else torch.empty_like(entropy)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], inputs[10], inputs[11])
    ctx.scalars = (inputs[8], inputs[9], *inputs[12:])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_metrics):
    # The token gradients carry no graph: a second derivative would silently miss their dependence on
    # logp, so create_graph=True is refused rather than answered wrongly.
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("fastrlhf.policy_loss has no double backward: call backward without create_graph=True")
    logp, old, adv, mask, ref, ent, isw, offsets, seq_weights, seq_log_ratio = ctx.saved_tensors
    row_length, per_seq, *options = ctx.scalars
    grad_logp, grad_entropy = torch.ops.fastrlhf.policy_loss_backward(
        grad_loss, logp, old, adv, mask, ref, ent, isw, offsets, row_length, per_seq, seq_weights, seq_log_ratio,
        *options)
    return (grad_logp, None, None, None, None, grad_entropy if ent is not None else None, *([None] * 16))


policy_loss_forward.register_autograd(_backward, setup_context=_setup_context)
