"""``fastrlhf.linear_logprobs``: log-probs and entropies straight from hidden states, a chunk of tokens at a time.

Registered as ``fastrlhf::linear_logprobs_forward`` / ``fastrlhf::linear_logprobs_backward`` with fake
implementations and autograd, so it runs under ``torch.compile(fullgraph=True)``. Each chunk's logits come
from a torch matmul (the CPU BLAS or cuBLAS) into one reused ``[chunk, V]`` buffer and go through the
log-prob kernels of ``fastrlhf.logprobs`` (C++ on CPU, Triton on CUDA); only per-token statistics survive
a chunk. The backward recomputes the logits a vocab slice at a time (same buffer size), turns them into
their gradient in place and multiplies it out into the gradients of hidden, weight and bias.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference
from fastrlhf.ops.logprobs import LOGIT_DTYPES, _canonical, _check_labels, backward_into, forward_local

# chunk_size=None: as many tokens as keep one chunk's logits near LOGITS_BUDGET bytes (counted at 4 bytes a
# logit whatever the dtype), but at least MIN_CHUNK tokens so that each chunk's matmuls stay efficient.
LOGITS_BUDGET = 32 << 20
MIN_CHUNK = 64


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                    temperature: float | Tensor = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: Optional[int] = None):
    """``fastrlhf.logprobs(hidden @ weight.T + bias, labels, ...)`` without ever holding all the logits.

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16 (the last hidden states).
        weight: ``[V, H]``, hidden's dtype and device (the lm_head as ``nn.Linear`` stores it; it may be
            tied to the input embedding).
        labels: ``[...]`` int64 or int32, hidden's leading shape; each in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None, hidden's dtype.
        temperature, ignore_index, return_entropy: as in ``fastrlhf.logprobs``.
        chunk_size: tokens per chunk; None picks ``default_chunk_size(tokens, V)``. Results do not
            depend on it beyond rounding.

    Returns:
        ``logp`` (fp32, ``[...]``), or ``(logp, entropy)``. The logits are computed in hidden's dtype
        (fp32 accumulation inside the matmul), the log-prob math in fp32. Gradients reach hidden, weight
        and bias (hidden's is summed over vocab slices in fp32). Peak memory is one buffer of
        ``chunk_size * V`` logits plus the gradients themselves.
    """
    if backend.forced_backend() == "reference":
        return reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
    _check_parameters(hidden, weight, bias)
    # hidden has exactly the leading shape, dtypes and layout rules of fastrlhf.logprobs' logits.
    flat_hidden, flat_labels, inv_temp = _canonical(hidden, labels, temperature)
    vocab = weight.shape[0]
    _check_labels(flat_labels, ignore_index, vocab)
    chunk = _chunk_size(chunk_size, flat_hidden.shape[0], vocab)
    logp, entropy, _ = torch.ops.fastrlhf.linear_logprobs_forward(flat_hidden, weight, bias, flat_labels, inv_temp,
                                                                   ignore_index, chunk)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def default_chunk_size(tokens: int, vocab: int) -> int:
    """``clamp(LOGITS_BUDGET // (4 * vocab), MIN_CHUNK, tokens)`` (at least 1)."""
    return max(1, min(tokens, max(MIN_CHUNK, LOGITS_BUDGET // (4 * vocab))))


def _chunk_size(chunk_size, tokens, vocab):
    if chunk_size is None:
        return default_chunk_size(tokens, vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of tokens, got {chunk_size}")
    return min(chunk_size, max(tokens, 1))


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
                            inv_temp: Tensor, ignore_index: int, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[N]`` fp32 log-probs, entropies and logsumexps (saved for the backward) of ``[N, H]`` hidden states."""
    like = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    logp, entropy, lse = backend.empty_outputs(like, 3)
    vocab = weight.shape[0]
    for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size):
        logp[rows], entropy[rows], lse[rows] = forward_local(logits, labels[rows], inv_temp[rows], ignore_index, 0,
                                                             vocab)
    return logp, entropy, lse


@linear_logprobs_forward.register_fake
def _(hidden, weight, bias, labels, inv_temp, ignore_index, chunk_size):
    like = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return like, torch.empty_like(like), torch.empty_like(like)


@torch.library.custom_op("fastrlhf::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             inv_temp: Tensor, lse: Tensor, entropy: Optional[Tensor], grad_logp: Tensor,
                             grad_entropy: Optional[Tensor], ignore_index: int, chunk_size: int,
                             needs_grad: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden ``[N, H]``, weight ``[V, H]`` and bias ``[V]``, each in its input's dtype; one
    not asked for in ``needs_grad`` (hidden, weight, bias) is returned as an empty ``[0]`` tensor.

    ``entropy`` and ``grad_entropy`` are both given or both None (no entropy term). The backward walks
    the vocabulary in slices of all tokens, with the forward's buffer size (``chunk_size * V`` logits):
    each slice's logits are recomputed and overwritten by their gradient G (the kernel takes the slice as
    a vocab shard and the per-token logsumexp and entropy of the whole row), then
    ``grad_weight[slice] = G.T @ h`` and ``grad_bias[slice] = G.sum(0)`` are final at once and only
    ``grad_hidden += G @ W[slice]`` accumulates, over a ``[N, H]`` buffer. Slicing by tokens instead
    would accumulate over the ``[V, H]`` weight gradient, reading and writing it once per chunk.
    """
    need_hidden, need_weight, need_bias = needs_grad
    tokens, vocab = hidden.shape[0], weight.shape[0]
    width = min(vocab, max(1, chunk_size * vocab // max(tokens, 1)))
    # Low precision accumulates grad_hidden in fp32 over the slices (fp32 operands too: the CPU has no
    # mixed-precision GEMM); fp32 accumulates in place.
    grad_hidden = torch.zeros(hidden.shape if need_hidden else 0, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = weight.new_empty(vocab if need_bias else 0)
    for cols, logits in _chunk_logits(hidden, weight, bias, width, by_vocab=True):
        backward_into(logits, logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index,
                      cols.start, vocab)
        if need_hidden:
            grad_hidden.addmm_(logits.float(), weight[cols].float())
        if need_weight:
            torch.mm(logits.t(), hidden, out=grad_weight[cols])
        if need_bias:
            grad_bias[cols] = logits.sum(0, dtype=torch.float32)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


@linear_logprobs_backward.register_fake
def _(hidden, weight, bias, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index, chunk_size,
      needs_grad):
    need_hidden, need_weight, need_bias = needs_grad
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0] if need_bias else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, ignore_index, chunk_size = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, inv_temp, lse, entropy)
    ctx.args = (ignore_index, chunk_size)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, inv_temp, lse, entropy = ctx.saved_tensors
    ignore_index, chunk_size = ctx.args
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if grad_entropy is None:
        entropy = None
    grad_hidden, grad_weight, grad_bias = torch.ops.fastrlhf.linear_logprobs_backward(
        hidden, weight, bias, labels, inv_temp, lse, entropy, grad_logp.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(), ignore_index, chunk_size, needs)
    return (grad_hidden if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None,
            None, None, None, None)


linear_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)
