"""Benchmark cases and verification checks of ``fastrlhf.linear_logprobs``.

Each case times a forward and backward from hidden states: the fused op (log-prob and entropy in one
pass, upstream gradients on both; the entropy's is zero so that the gradients can be checked against
the references, which give log-probs only) against the unfused ``hidden @ weight.T`` + ``log_softmax`` +
``gather``, and against torch's chunked ``-F.linear_cross_entropy(..., reduction="none")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import K, Case, Check, bound, compute_dtype, outputs_and_grads, within
from fastrlhf.bench.logprobs import scales


def _inputs(tokens: int, hidden: int, vocab: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * (3.0 / hidden ** 0.5)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    grad_logp = torch.randn(tokens, generator=g)
    return h, w, labels, grad_logp, torch.zeros(tokens)


def fused(h, w, labels, grad_logp, grad_entropy):
    """(logp, grad hidden, grad weight) of fastrlhf.linear_logprobs with its entropy."""
    logp, entropy = fastrlhf.linear_logprobs(h, w, labels, return_entropy=True)
    return (logp.detach(), *torch.autograd.grad((logp, entropy), (h, w), (grad_logp, grad_entropy)))


def unfused(h, w, labels, grad_logp, grad_entropy):
    """The whole logits tensor, ``log_softmax`` and ``gather``, as trainers write it."""
    logp = torch.gather(F.linear(h, w).log_softmax(-1), -1, labels[:, None])[:, 0]
    return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad_logp))


def torch_chunked(h, w, labels, grad_logp, grad_entropy):
    """torch's own chunked linear + cross entropy (no entropy, no temperature), negated."""
    logp = -F.linear_cross_entropy(h, w, labels, reduction="none", options=torch.nn.LinearCrossEntropyOptions())
    return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad_logp))


def _same(got, want):
    for name, x, y in zip(("logp", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def cases(quick: bool) -> list[Case]:
    shapes = [(512, 256, 8000)] if quick else [(4096, 1024, 32000), (2048, 2048, 151936)]
    out = []
    for tokens, hidden, vocab in shapes:
        # Floor: hidden and weight read, their gradients written, labels and upstream read, logp written.
        floor = 4 * 2 * (tokens + vocab) * hidden + tokens * (8 + 3 * 4)
        out.append(Case("linear_logprobs fwd+bwd", f"N={tokens} H={hidden} V={vocab} fp32",
                        lambda t=tokens, h=hidden, v=vocab: _inputs(t, h, v), fused,
                        {"unfused log_softmax+gather": unfused, "torch chunked linear_cross_entropy": torch_chunked},
                        floor, _same, x=tokens))
    return out


def checks() -> list[Check]:
    grid = [(1, 8, 5), (37, 24, 301), (130, 64, 1000)]
    return [Check("linear_logprobs", f"N={n} H={h} V={v}", dtype,
                  lambda device, n=n, h=h, v=v, dtype=dtype: _check(n, h, v, dtype, device))
            for n, h, v in grid for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Outputs and gradients of the op against float64 on the rounded inputs."""
    g = torch.Generator().manual_seed(tokens * vocab)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (3.0 / hidden ** 0.5)
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    h, w, b = (x.to(dtype).double() for x in (h, w, b))
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[1::4] = -100  # row 0 always counts (N=1)
    upstream = [torch.randn(tokens, generator=g, dtype=torch.float64) for _ in range(2)]
    temperature = 0.8

    def run(fn, dt, dev):
        leaves = [x.to(dtype=dt, device=dev).requires_grad_() for x in (h, w, b)]
        outs = fn(leaves[0], leaves[1], labels.to(dev), bias=leaves[2], temperature=temperature,
                  return_entropy=True, chunk_size=16)
        return outputs_and_grads(outs, leaves, upstream)

    got = run(fastrlhf.linear_logprobs, dtype, device)
    exact = run(reference.linear_logprobs, torch.float64, "cpu")
    # Each logit is a dot product over H plus the bias (magnitudes |h| |W|^T + |b|), stored in hidden's
    # dtype as documented (half an ulp of |z|, expressed in units of K roundings of the compute dtype).
    # The logits' gradient G carries the errors that ``logprobs`` bounds and is stored in hidden's dtype
    # too; each gradient GEMM adds its own rounding of the products it sums, so both scale with
    # (bound of G + |G|) times the other operand's magnitudes.
    compute = compute_dtype(dtype)
    stored_logits = torch.finfo(dtype).eps / (2 * K * torch.finfo(compute).eps)
    z = torch.nn.functional.linear(h, w, b) / temperature
    z.requires_grad_()
    logp, entropy = reference.logprobs(z, labels, return_entropy=True)
    grad_z = torch.autograd.grad((logp * upstream[0]).sum() + (entropy * upstream[1]).sum(), z)[0]
    z_scale = (h.abs() @ w.abs().T + b.abs()) / temperature + stored_logits * z.detach().abs()
    row, grad_scale = scales(z.detach(), z_scale, labels, torch.stack(upstream), temperature)
    g_scale = grad_scale + (1 + stored_logits) * grad_z.abs() / temperature
    output_scales = (row, row, g_scale @ w.abs(), g_scale.T @ h.abs(), g_scale.sum(0))
    names = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")
    stored = (compute, compute, dtype, dtype, dtype)
    return {n: within(gt, e, bound(e, sc, compute, st))
            for n, gt, e, sc, st in zip(names, got, exact, output_scales, stored)}
