"""The log-prob kernels on one device's rows (of one shard of the vocabulary), as registered ops.

``fastrlhf.logprobs`` (``fastrlhf/ops/logprobs.py``) calls them directly, or through the vocab-parallel
combination (``logprobs_parallel.py``); ``linear_logprobs`` and ``linear_policy_loss`` call them per chunk.
Registered as ``fastrlhf::logprobs_forward`` / ``fastrlhf::logprobs_backward`` (and the in-place
``fastrlhf::logprobs_backward_``) with fake implementations and autograd, so it runs under
``torch.compile(fullgraph=True)``. CPU tensors run the C++ kernel, CUDA tensors the Triton kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def with_kept(logp, entropy, labels, ignore_index, return_entropy, return_kept):
    """The outputs as ``logprobs`` returns them; ``kept``: the label could be drawn (or is ignored)."""
    outputs = (logp, entropy) if return_entropy else (logp,)
    if return_kept:
        outputs = (*outputs, (logp.detach() > -torch.inf) | (labels == ignore_index))
    return outputs if len(outputs) > 1 else outputs[0]


def canonical(logits, labels, temperature):
    """Checks the arguments; returns ``[N, V]`` logits, ``[N]`` int64 labels and ``[N]`` 1/T (in the
    accumulation dtype: fp64 for fp64 logits, else fp32)."""
    checks.dtype("logits", logits, LOGIT_DTYPES)
    checks.dtype("labels", labels, checks.INTS)
    checks.device("labels", labels, logits.device)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    checks.shape("labels", labels, logits.shape[:-1])
    flat = rows_view(logits)
    rows = labels.numel()
    acc = acc_dtype(logits)
    if isinstance(temperature, Tensor):
        checks.device("temperature", temperature, logits.device)
        if not temperature.is_floating_point():
            raise TypeError(f"temperature: expected a floating tensor, got {temperature.dtype}")
        try:
            t = torch.broadcast_to(temperature.detach(), labels.shape)
        except RuntimeError:
            raise ValueError(f"temperature: expected a shape broadcastable to {tuple(labels.shape)}, "
                             f"got {tuple(temperature.shape)}") from None
        if checks.values_checked(t) and not bool((t > 0).all()):
            raise ValueError(f"temperature: expected positive values, got min {t.min().item()}")
        t = t.reshape(-1).to(acc)
        inv_temp = torch.where(t > 0, t.reciprocal(), torch.nan)  # NaN poisons the row: no host sync
    else:
        if not float(temperature) > 0:
            raise ValueError(f"temperature: expected a positive value, got {temperature}")
        # A tensor filled on device, never a Python float argument: it cannot become fp64 under
        # Inductor, and a new value does not recompile.
        inv_temp = torch.full((rows,), 1.0 / temperature, dtype=acc, device=logits.device)
    return flat, labels.reshape(-1).to(torch.int64), inv_temp.contiguous()


def rows_view(logits):
    """``[..., V]`` logits as ``[N, V]`` or ``[B, T, V]`` (the kernels take both strides of the latter), a
    view whenever the strides allow; a copy only for a non-unit vocab stride or uncollapsible leading dims.
    Decided from the strides (no failing ``view`` to catch: fake tensors raise another error type)."""
    vocab = logits.shape[-1]
    if logits.stride(-1) == 1 or vocab == 1:
        if _collapsible(logits, logits.dim() - 1):
            return logits.view(-1, vocab)
        if logits.dim() >= 3 and _collapsible(logits, logits.dim() - 2):
            return logits.view(-1, *logits.shape[-2:])
    return logits.reshape(-1, vocab).contiguous()


def _collapsible(t, dims):
    """Whether the first ``dims`` dims of ``t`` merge into one by a view (size-1 dims do not matter)."""
    expected = None
    for size, stride in reversed(list(zip(t.shape[:dims], t.stride()[:dims]))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_labels(labels, ignore_index, vocab):
    """Raises with the offending value where ``checks.values_checked``; elsewhere the kernels poison (Triton)
    or refuse (C++) out-of-range labels."""
    if not checks.values_checked(labels) or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {value}")


def forward_local(logits, labels, inv_temp, threshold, ignore_index, vocab_start, vocab_size, extras=None):
    """``(logp, entropy, lse)`` of the kernel on one (shard of the) vocabulary; see ``csrc/logprobs.cpp``.

    ``threshold`` (``[N]``, the accumulation dtype, or None): per row, logits whose ``z = x / T`` lies below
    it are outside the kept set, as if ``-inf``; a label outside it gets log-prob ``-inf``.
    ``extras`` (``[3, N]``, the accumulation dtype, or None; not with a threshold): also written per row,
    from the same pass: ``log sum p^2``, the mean of ``z`` and 1 where the label is the first arg-max of
    ``z`` (else 0); 0 for ignored rows.
    """
    like = logits.new_empty(labels.shape[0], dtype=acc_dtype(logits))
    logp, entropy, lse = backend.empty_outputs(like, 3)
    backend.kernels("logprobs", logits).logprobs_forward(logits, labels, inv_temp, threshold, ignore_index,
                                                         vocab_start, vocab_size, logp, entropy, lse, extras)
    return logp, entropy, lse


def backward_into(out, logits, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index,
                  vocab_start, vocab_size):
    """Writes the logits' gradient into ``out`` (which may be ``logits`` itself); zero outside the kept set.
    Rows whose label lies outside the kept set need zero upstream gradients (``kept_upstream``)."""
    backend.kernels("logprobs", logits).logprobs_backward(logits, labels, inv_temp, threshold, lse, entropy,
                                                          grad_logp, grad_entropy, ignore_index, vocab_start,
                                                          vocab_size, out)


def kept_upstream(grad, logp, threshold):
    """``grad`` (``[N]`` or None) with the rows whose label fell outside the kept set zeroed: their log-prob
    is ``-inf`` under a finite threshold, and their whole gradient row is 0 (the sampler could not have
    drawn the label; trainers mask such tokens)."""
    if grad is None or threshold is None:
        return grad
    return grad.masked_fill((logp == -torch.inf) & (threshold > -torch.inf), 0.0)


@torch.library.custom_op("fastrlhf::logprobs_forward", mutates_args=())
def logprobs_forward(logits: Tensor, labels: Tensor, inv_temp: Tensor, threshold: Optional[Tensor],
                     ignore_index: int, vocab_start: int, vocab_size: int,
                     inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``[N]`` log-probs, entropies and logsumexps (the last saved for the backward), fp32 (fp64 for fp64)."""
    return forward_local(logits, labels, inv_temp, threshold, ignore_index, vocab_start, vocab_size)


@logprobs_forward.register_fake
def _(logits, labels, inv_temp, threshold, ignore_index, vocab_start, vocab_size, inplace_backward):
    like = logits.new_empty(labels.shape[0], dtype=acc_dtype(logits))
    return like, torch.empty_like(like), torch.empty_like(like)


@torch.library.custom_op("fastrlhf::logprobs_backward", mutates_args=())
def logprobs_backward(logits: Tensor, labels: Tensor, inv_temp: Tensor, threshold: Optional[Tensor], lse: Tensor,
                      entropy: Optional[Tensor], grad_logp: Tensor, grad_entropy: Optional[Tensor],
                      ignore_index: int, vocab_start: int, vocab_size: int) -> Tensor:
    """The gradient of ``logits`` (same dtype), recomputed from the saved per-row logsumexp."""
    out = backend.empty_outputs(torch.empty_like(logits, memory_format=torch.contiguous_format), 1)[0]
    backward_into(out, logits, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index,
                  vocab_start, vocab_size)
    return out


@logprobs_backward.register_fake
def _(logits, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index, vocab_start,
      vocab_size):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastrlhf::logprobs_backward_", mutates_args=("logits",))
def logprobs_backward_(logits: Tensor, labels: Tensor, inv_temp: Tensor, threshold: Optional[Tensor], lse: Tensor,
                       entropy: Optional[Tensor], grad_logp: Tensor, grad_entropy: Optional[Tensor],
                       ignore_index: int, vocab_start: int, vocab_size: int) -> None:
    """As ``logprobs_backward``, writing the gradient over ``logits``; declared as a mutation, so the
    logits' version counter moves and any later use of them in autograd raises."""
    backward_into(logits, logits, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index,
                  vocab_start, vocab_size)


def logits_grad(logits, labels, inv_temp, threshold, logp, lse, entropy, grad_logp, grad_entropy, ignore_index,
                vocab_start, vocab_size, inplace):
    """The logits' gradient through the registered ops; ``grad_entropy=None`` skips the entropy term. Rows
    whose label lies outside the kept set (``logp`` -inf under ``threshold``) get a zero gradient."""
    if grad_entropy is None:
        entropy = None
    grad_logp, grad_entropy = (kept_upstream(g, logp, threshold) for g in (grad_logp, grad_entropy))
    args = (labels, inv_temp, threshold, lse, entropy, grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(), ignore_index, vocab_start, vocab_size)
    if inplace:
        torch.ops.fastrlhf.logprobs_backward_(logits, *args)
        return logits
    return torch.ops.fastrlhf.logprobs_backward(logits, *args)


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temp, threshold, ignore_index, vocab_start, vocab_size, inplace = inputs
    logp, entropy, lse = output
    ctx.save_for_backward(logits, labels, inv_temp, threshold, logp, lse, entropy)
    ctx.args = (ignore_index, vocab_start, vocab_size, inplace)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, inv_temp, threshold, logp, lse, entropy = ctx.saved_tensors
    ignore_index, vocab_start, vocab_size, inplace = ctx.args
    grad = logits_grad(logits, labels, inv_temp, threshold, logp, lse, entropy, grad_logp, grad_entropy,
                       ignore_index, vocab_start, vocab_size, inplace)
    return grad, None, None, None, None, None, None, None


logprobs_forward.register_autograd(_backward, setup_context=_setup_context)
