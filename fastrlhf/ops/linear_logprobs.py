"""``fastrlhf.linear_logprobs``: log-probs and entropies straight from hidden states, a chunk of tokens at a time.

Registered as ``fastrlhf::linear_logprobs_forward`` / ``fastrlhf::linear_logprobs_backward`` with fake
implementations and autograd, so it runs under ``torch.compile(fullgraph=True)``. Each chunk's logits come
from a torch matmul (the CPU BLAS or cuBLAS) into one reused ``[chunk, V]`` buffer and go through the
log-prob kernels of ``fastrlhf.logprobs`` (C++ on CPU, Triton on CUDA); only per-token statistics survive
a chunk. The backward recomputes the logits a vocab slice ``[N, width]`` at a time, turns them into
their gradient in place and multiplies it out into the gradients of hidden, weight and bias.

With the sampler's filters (``top_k``, ``top_p``, ``min_p``) each forward chunk's per-row thresholds come from
that chunk's logits (``fastrlhf.sampling_threshold``'s kernels, selection, no sort) and are saved; the backward
then recomputes the logits by the forward's own token chunks (the same GEMM calls, so the same bits: the
token at a threshold sits exactly on it, and a vocab slice's GEMM, rounding differently, could drop it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference
from fastrlhf.ops.logprobs_local import (LOGIT_DTYPES, acc_dtype, backward_into, canonical, check_labels, forward_local,
                                         kept_upstream, with_kept)
from fastrlhf.ops.sampling_threshold import row_filters, threshold_into

# chunk_size=None sizes the two passes apart (logits counted at 4 bytes whatever the dtype). The forward
# holds nothing else, and its token chunks get slow when small (each chunk's matmul streams all of the
# weight: 4096 x 1024 x 32000 fp32 took 13.4 s at 64 tokens, 5.7 s at 2048 on this 2-core machine under
# other jobs' load), so it takes FORWARD_BUDGET, but no more logits than the weight has entries (at most
# H tokens), which the backward's gradient needs anyway. The backward's buffer comes on top of the
# weight's gradient, and its vocab slices cost nothing when narrow (19.8 s at 500 and at 16000 columns),
# so it takes BACKWARD_BUDGET, but no more logits than the hidden states have (at most H columns).
# On CUDA both budgets are in the GiB range (CUDA_BUDGET): a launch per slice costs more there than a
# slice's few MiB take to multiply (8 MiB slices were 600-1200 slices of 6 launches at 8-16k tokens).
FORWARD_BUDGET = 128 << 20
BACKWARD_BUDGET = 8 << 20
CUDA_BUDGET = 1 << 30
MIN_CHUNK = 32      # tokens per forward chunk
MIN_SLICE = 128     # vocab columns per backward slice


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                    temperature: float | Tensor = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: Optional[int] = None, top_k=None, top_p=None, min_p=None, return_kept: bool = False,
                    return_extras: bool = False):
    """``fastrlhf.logprobs(hidden @ weight.T + bias, labels, ...)`` without ever holding all the logits.

    Args:
        hidden: ``[..., H]`` fp32, bf16, fp16 or fp64 (the last hidden states).
        weight: ``[V, H]``, hidden's dtype and device (the lm_head as ``nn.Linear`` stores it; it may be
            tied to the input embedding).
        labels: ``[...]`` int64 or int32, hidden's leading shape; each in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None, hidden's dtype.
        temperature, ignore_index, return_entropy: as in ``fastrlhf.logprobs``.
        chunk_size: tokens per forward chunk; the backward then takes vocab slices of the same size
            (``chunk_size * V`` logits). None sizes both from FORWARD_BUDGET and BACKWARD_BUDGET
            (``chunking``). Results do not depend on it beyond rounding.
        top_k, top_p, min_p, return_kept: the sampler's filters, as in ``fastrlhf.logprobs`` (numbers or
            tensors broadcastable to ``[...]``); each row's thresholds come from its chunk's logits, computed
            in hidden's dtype. The backward then walks the forward's token chunks instead of vocab slices.
        return_extras: also return, from the same pass over each chunk's logits (not with the filters),
            TRL's ``ChunkedLogProbFunction`` outputs, each ``[...]`` and not differentiable:
            ``log_sum_sq_probs`` (``log sum_v p_v^2``, fp32), ``mean_logits`` (the mean of ``z = logits /
            T``, fp32) and ``is_top1`` (bool: the label is the first arg-max of z); 0 / False at ignored rows.

    Returns:
        ``logp`` (``[...]``, fp32; fp64 for fp64), or ``(logp, entropy)``, then ``kept``, then the three
        extras, if asked. The logits are computed in hidden's dtype (fp32 accumulation inside the matmul),
        the log-prob math in fp32 (fp64 for fp64). Gradients reach hidden, weight and bias (summed over
        vocab slices, or with filters over token chunks, in fp32 or fp64). Peak memory is one chunk's logits
        plus the gradients themselves.
    """
    if backend.forced_backend() == "reference":
        return reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy, top_k=top_k,
                                         top_p=top_p, min_p=min_p, return_kept=return_kept)
    flat_hidden, flat_labels, inv_temp, filters = canonical_linear(hidden, weight, bias, labels, temperature,
                                                                   ignore_index, top_k, top_p, min_p)
    vocab = weight.shape[0]
    if return_extras and filters[0] is not None:
        raise ValueError("return_extras: not computed with top_k, top_p or min_p (TRL's outputs are unfiltered)")
    chunk, width = chunking(chunk_size, flat_hidden.shape[0], vocab, weight.shape[1], hidden.device)
    logp, entropy, _, _, extras = torch.ops.fastrlhf.linear_logprobs_forward(
        flat_hidden, weight, bias, flat_labels, inv_temp, *filters, ignore_index, chunk, width, return_extras)
    outputs = with_kept(logp.view(labels.shape), entropy.view(labels.shape), labels, ignore_index, return_entropy,
                        return_kept)
    if not return_extras:
        return outputs
    log_sum_sq, mean_z, top1 = extras.to(torch.float32).view(3, *labels.shape)
    return (*(outputs if isinstance(outputs, tuple) else (outputs,)), log_sum_sq, mean_z, top1 != 0)


def budgets(device: torch.device) -> tuple[int, int]:
    """Bytes of logits (counted at 4 bytes each) of a forward chunk and of a backward slice on ``device``:
    CUDA_BUDGET for both on CUDA, FORWARD_BUDGET and BACKWARD_BUDGET elsewhere."""
    return (CUDA_BUDGET, CUDA_BUDGET) if torch.device(device).type == "cuda" else (FORWARD_BUDGET, BACKWARD_BUDGET)


def mixed_precision_gemm(device: torch.device) -> bool:
    """Whether bf16/fp16 products accumulate into an fp32 output inside the GEMM on ``device`` (CUDA:
    ``torch.addmm(..., out_dtype=)``, tensor cores); the CPU has no such GEMM and upcasts the operands."""
    return torch.device(device).type == "cuda"


def accumulate_mm(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a @ b`` with ``out`` in the accumulation dtype (fp32, fp64 for fp64 operands). Operands of
    ``out``'s dtype accumulate in place; bf16/fp16 operands go into the GEMM as they are where
    ``mixed_precision_gemm`` (fp32 accumulation into ``out``, no copies), and are upcast elsewhere."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif mixed_precision_gemm(out.device):
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def chunking(chunk_size: Optional[int], tokens: int, vocab: int, hidden: int,
             device: torch.device = torch.device("cpu")) -> tuple[int, int]:
    """(tokens per forward chunk, vocab columns per backward slice), each at least 1.

    None: ``clamp(min(forward budget / (4 V), H), MIN_CHUNK, tokens)`` tokens and
    ``clamp(min(backward budget / (4 tokens), H), MIN_SLICE, V)`` columns, the budgets ``budgets(device)``.
    A given ``chunk_size``: that many tokens (at most all), and slices of as many logits,
    ``chunk_size * V / tokens`` columns.
    """
    if chunk_size is None:
        forward, backward = budgets(device)
        return (max(1, min(tokens, max(MIN_CHUNK, min(forward // (4 * vocab), hidden)))),
                min(vocab, max(MIN_SLICE, min(backward // (4 * max(tokens, 1)), hidden))))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of tokens, got {chunk_size}")
    chunk = min(chunk_size, max(tokens, 1))
    return chunk, min(vocab, max(1, chunk * vocab // max(tokens, 1)))


def canonical_linear(hidden, weight, bias, labels, temperature, ignore_index, top_k, top_p, min_p):
    """The arguments both linear ops share, checked: ``[N, H]`` hidden states, ``[N]`` int64 labels, ``[N]``
    1/T and the per-row sampler filters (``(None, None, None)`` without them)."""
    _check_parameters(hidden, weight, bias)
    # hidden has exactly the leading shape, dtypes and layout rules of fastrlhf.logprobs' logits.
    flat_hidden, flat_labels, inv_temp = canonical(hidden, labels, temperature)
    flat_hidden = flat_hidden.reshape(-1, hidden.shape[-1])  # the GEMMs take [N, H]
    filters = row_filters(top_k, top_p, min_p, labels.shape, inv_temp) or (None, None, None)
    check_labels(flat_labels, ignore_index, weight.shape[0])
    return flat_hidden, flat_labels, inv_temp, filters


def _check_parameters(hidden, weight, bias):
    checks.dtype("hidden", hidden, LOGIT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    checks.dtype("weight", weight, (hidden.dtype,))
    checks.device("weight", weight, hidden.device)
    checks.ndim("weight", weight, (2,))
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (V >= 1, H from hidden), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        checks.dtype("bias", bias, (hidden.dtype,))
        checks.device("bias", bias, hidden.device)
        checks.shape("bias", bias, (weight.shape[0],))


def _chunk_logits(hidden, weight, bias, step, by_vocab=False):
    """Yields ``(part, logits)`` for consecutive slices ``part`` of the tokens (or, ``by_vocab``, of the
    vocabulary): ``hidden[part] @ weight.T + bias`` (or ``hidden @ weight[part].T + bias[part]``), each
    written into the same buffer of ``step`` rows (columns), so at most one chunk of logits is alive."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    total, other = (vocab, tokens) if by_vocab else (tokens, vocab)
    buffer = hidden.new_empty(min(step, total) * other)
    for start in range(0, total, step):
        part = slice(start, min(start + step, total))
        h, w = (hidden, weight[part]) if by_vocab else (hidden[part], weight)
        logits = buffer[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
        if bias is None:
            torch.mm(h, w.t(), out=logits)
        else:
            torch.addmm(bias[part] if by_vocab else bias, h, w.t(), out=logits)
        yield part, logits


@torch.library.custom_op("fastrlhf::linear_logprobs_forward", mutates_args=())
def linear_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                            inv_temp: Tensor, top_k: Optional[Tensor], top_p: Optional[Tensor],
                            min_p: Optional[Tensor], ignore_index: int, chunk_size: int,
                            slice_width: int, extras: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``[N]`` log-probs, entropies and logsumexps (saved for the backward) of ``[N, H]`` hidden states,
    ``chunk_size`` tokens at a time; ``slice_width`` is the backward's. ``top_k`` (int64), ``top_p``,
    ``min_p``: ``[N]`` sampler filters (``sampling_threshold.row_filters``), all three or none. Also returns
    the ``[N]`` kept-set thresholds found from each chunk's logits (saved for the backward), ``[0]`` without
    filters, and with ``extras`` the ``[3, N]`` extras of ``logprobs_local.forward_local`` (else ``[0]``)."""
    like = hidden.new_empty(hidden.shape[0], dtype=acc_dtype(hidden))
    logp, entropy, lse = backend.empty_outputs(like, 3)
    filtered = top_k is not None
    threshold = backend.empty_outputs(like, 1)[0] if filtered else like.new_empty(0)
    row_extras = backend.empty_outputs(like.new_empty(3, like.shape[0]), 1)[0] if extras else like.new_empty(0)
    vocab = weight.shape[0]
    for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size):
        part_threshold = None
        if filtered:
            part_threshold = threshold[rows]
            threshold_into(logits, inv_temp[rows], top_k[rows], top_p[rows], min_p[rows], part_threshold)
        part_extras = backend.empty_outputs(like.new_empty(3, logits.shape[0]), 1)[0] if extras else None
        logp[rows], entropy[rows], lse[rows] = forward_local(logits, labels[rows], inv_temp[rows], part_threshold,
                                                             ignore_index, 0, vocab, part_extras)
        if extras:
            row_extras[:, rows] = part_extras
    return logp, entropy, lse, threshold, row_extras


@linear_logprobs_forward.register_fake
def _(hidden, weight, bias, labels, inv_temp, top_k, top_p, min_p, ignore_index, chunk_size, slice_width,
      extras=False):
    like = hidden.new_empty(hidden.shape[0], dtype=acc_dtype(hidden))
    return (like, torch.empty_like(like), torch.empty_like(like), like.new_empty(0 if top_k is None else like.shape[0]),
            like.new_empty((3, like.shape[0]) if extras else (0,)))


@torch.library.custom_op("fastrlhf::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             inv_temp: Tensor, threshold: Optional[Tensor], lse: Tensor, entropy: Optional[Tensor],
                             grad_logp: Tensor, grad_entropy: Optional[Tensor], ignore_index: int, chunk_size: int,
                             slice_width: int, needs_grad: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden ``[N, H]``, weight ``[V, H]`` and bias ``[V]``, each in its input's dtype; one
    not asked for in ``needs_grad`` (hidden, weight, bias) is returned as an empty ``[0]`` tensor.

    ``entropy`` and ``grad_entropy`` are both given or both None (no entropy term). Without a ``threshold``
    the backward walks the vocabulary in slices of ``slice_width`` columns and all tokens: each slice's
    logits are recomputed and overwritten by their gradient G (the kernel takes the slice as a vocab shard
    and the per-token logsumexp and entropy of the whole row), then
    ``grad_weight[slice] = G.T @ h`` and ``grad_bias[slice] = G.sum(0)`` are final at once and only
    ``grad_hidden += G @ W[slice]`` accumulates, over a ``[N, H]`` buffer. Slicing by tokens instead
    would accumulate over the ``[V, H]`` weight gradient, reading and writing it once per chunk.
    With a ``threshold`` (the forward's kept sets) it walks the forward's ``chunk_size`` token chunks, whose
    recomputed logits are bitwise the forward's, so each row keeps exactly the tokens it kept there.
    """
    need_hidden, need_weight, need_bias = needs_grad
    vocab = weight.shape[0]
    acc = acc_dtype(hidden)
    if threshold is not None:
        grad_hidden = backend.empty_outputs(hidden, 1)[0] if need_hidden else hidden.new_empty(0)
        grad_weight = torch.zeros(weight.shape if need_weight else 0, dtype=acc, device=weight.device)
        grad_bias = torch.zeros(vocab if need_bias else 0, dtype=acc, device=weight.device)
        for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size):
            backward_into(logits, logits, labels[rows], inv_temp[rows], threshold[rows], lse[rows],
                          None if entropy is None else entropy[rows], grad_logp[rows],
                          None if grad_entropy is None else grad_entropy[rows], ignore_index, 0, vocab)
            chunk_grads(logits, hidden, weight, rows, grad_hidden, grad_weight, grad_bias, needs_grad)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    # grad_hidden accumulates over the slices in fp32 (fp64) whatever the operands' dtype.
    grad_hidden = torch.zeros(hidden.shape if need_hidden else 0, dtype=acc, device=hidden.device)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = weight.new_empty(vocab if need_bias else 0)
    for cols, logits in _chunk_logits(hidden, weight, bias, slice_width, by_vocab=True):
        backward_into(logits, logits, labels, inv_temp, None, lse, entropy, grad_logp, grad_entropy, ignore_index,
                      cols.start, vocab)
        if need_hidden:
            accumulate_mm(grad_hidden, logits, weight[cols])
        if need_weight:
            torch.mm(logits.t(), hidden, out=grad_weight[cols])
        if need_bias:
            grad_bias[cols] = logits.sum(0, dtype=acc)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


def chunk_grads(grad_logits, hidden, weight, rows, grad_hidden, grad_weight, grad_bias, needs_grad):
    """One token chunk's share of the gradients, from ``grad_logits`` ``[chunk, V]`` (the logits' dtype):
    ``grad_hidden[rows] = G @ weight`` (final), ``grad_weight += G.T @ hidden[rows]`` and
    ``grad_bias += G.sum(0)`` (accumulation-dtype buffers)."""
    need_hidden, need_weight, need_bias = needs_grad
    if need_hidden:
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if need_weight:
        accumulate_mm(grad_weight, grad_logits.t(), hidden[rows])
    if need_bias:
        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)


@linear_logprobs_backward.register_fake
def _(hidden, weight, bias, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index,
      chunk_size, slice_width, needs_grad):
    need_hidden, need_weight, need_bias = needs_grad
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0] if need_bias else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, top_k, _, _, ignore_index, chunk_size, slice_width, _ = inputs
    logp, entropy, lse, threshold, extras = output
    ctx.mark_non_differentiable(extras)
    ctx.save_for_backward(hidden, weight, bias, labels, inv_temp, None if top_k is None else threshold, logp, lse,
                          entropy)
    ctx.args = (ignore_index, chunk_size, slice_width)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_threshold, _grad_extras):
    hidden, weight, bias, labels, inv_temp, threshold, logp, lse, entropy = ctx.saved_tensors
    ignore_index, chunk_size, slice_width = ctx.args
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if grad_entropy is None:
        entropy = None
    grad_logp, grad_entropy = (kept_upstream(g, logp, threshold) for g in (grad_logp, grad_entropy))
    grad_hidden, grad_weight, grad_bias = torch.ops.fastrlhf.linear_logprobs_backward(
        hidden, weight, bias, labels, inv_temp, threshold, lse, entropy, grad_logp.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(), ignore_index, chunk_size, slice_width, needs)
    return (grad_hidden if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None,
            *([None] * 9))


linear_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)
