"""Benchmark cases and verification checks of ``fastrlhf.logprobs`` (log-probs and entropy together)."""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check, errors, outputs_and_grads

REFERENCES = {"log_softmax+gather": reference.logprobs, "row loop (TRL)": reference.selective_logprobs}


def _inputs(tokens: int, vocab: int, dtype=torch.float32, seed=0):
    """Logits at a trained model's scale (a few large logits per row), labels, and upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[3::17] = -100
    upstream = torch.randn(2, tokens, generator=g)
    return logits, labels, upstream


def _forward(fn):
    return lambda logits, labels, upstream: fn(logits, labels, temperature=0.7, return_entropy=True)


def _forward_backward(fn, **kw):
    """The logits' gradient of ``sum(upstream * (logp, entropy))``, through a fresh view of the logits."""
    def run(logits, labels, upstream):
        x = logits.detach().requires_grad_()
        logp, entropy = fn(x, labels, temperature=0.7, return_entropy=True, **kw)
        (grad,) = torch.autograd.grad((logp * upstream[0]).sum() + (entropy * upstream[1]).sum(), x)
        return grad
    return run


def _same_outputs(got, want):
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _same_grad(got, want):
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-5)


def cases(quick: bool) -> list[Case]:
    shapes = [(64, 16000, torch.float32)] if quick else [
        (tokens, vocab, dtype) for tokens, vocab in ((4096, 32000), (2048, 151936))
        for dtype in (torch.float32, torch.bfloat16)]
    out = []
    for tokens, vocab, dtype in shapes:
        make = lambda t=tokens, v=vocab, d=dtype: _inputs(t, v, d)  # noqa: E731
        shape = f"N={tokens} V={vocab} {str(dtype).removeprefix('torch.')}"
        logits_bytes = tokens * vocab * dtype.itemsize
        out.append(Case("logprobs fwd", shape, make, _forward(fastrlhf.logprobs),
                        {name: _forward(fn) for name, fn in REFERENCES.items()}, logits_bytes, _same_outputs))
        backward_refs = {"log_softmax+gather": _forward_backward(reference.logprobs)}
        out.append(Case("logprobs fwd+bwd", shape, make, _forward_backward(fastrlhf.logprobs), backward_refs,
                        3 * logits_bytes, _same_grad))
        # The gradient overwrites the logits, so the fused run changes the inputs the reference would see:
        # no comparison here (tests/ops/test_logprobs.py checks that the in-place gradient is the same).
        out.append(Case("logprobs fwd+bwd in place", shape, make,
                        _forward_backward(fastrlhf.logprobs, inplace_backward=True), backward_refs,
                        3 * logits_bytes, None))
    return out


def checks() -> list[Check]:
    grid = [(1, 1), (7, 2), (33, 1000), (5, 40007)]
    return [Check("logprobs", f"N={n} V={v}", dtype,
                  lambda device, n=n, v=v, dtype=dtype: _check(n, v, dtype, device))
            for n, v in grid for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Outputs and the logits' gradient of the kernel, the float64 reference, and PyTorch in ``dtype``."""
    logits, labels, upstream = _inputs(tokens, vocab, torch.float64, seed=tokens * vocab)
    logits[0, 0] += 20.0  # a peaked row
    # The exact answer for the logits the kernel sees: the rounded ones.
    logits, upstream = logits.to(dtype).double(), upstream.double()

    def run(fn, dt, dev):
        x = logits.to(dtype=dt, device=dev).requires_grad_()
        outs = fn(x, labels.to(dev), temperature=0.7, return_entropy=True)
        return outputs_and_grads(outs, [x], upstream)

    return errors(("logp", "entropy", "grad logits"), run, fastrlhf.logprobs, reference.logprobs, _in_precision,
                  dtype, device)


def _in_precision(logits, labels, *, temperature, return_entropy):
    """The reference computed in the logits' own precision, as PyTorch would without upcasting."""
    z = logits / temperature
    logp_all = z.log_softmax(-1)
    ignored = labels == -100
    logp = logp_all.gather(-1, labels.masked_fill(ignored, 0)[..., None])[..., 0].masked_fill(ignored, 0)
    entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(ignored, 0)
    return logp, entropy
