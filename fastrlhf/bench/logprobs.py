"""Benchmark cases and verification checks of ``fastrlhf.logprobs`` (log-probs and entropy together)."""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check, bound, compute_dtype, outputs_and_grads, within

REFERENCES = {"log_softmax+gather": reference.logprobs, "row loop (TRL)": reference.selective_logprobs}


def _inputs(tokens: int, vocab: int, dtype=torch.float32, seed=0):
    """Logits at a trained model's scale (a few large logits per row), labels, and upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[3::17] = -100
    upstream = torch.randn(2, tokens, generator=g)
    return logits, labels, upstream


# The sampler's filters of issue 15's benchmark: vLLM's processed log-probs.
FILTERS = dict(top_k=50, top_p=0.9, min_p=0.05)


def _sampled_inputs(tokens: int, vocab: int):
    """As ``_inputs``, with labels the sampler could draw (a kept token: half the row maxima, half the
    tokens ranked 2nd), so the log-probs compared are finite."""
    logits, labels, upstream = _inputs(tokens, vocab)
    ranked = logits.topk(2, dim=-1).indices
    drawn = torch.where(torch.arange(tokens) % 2 == 0, ranked[:, 0], ranked[:, 1])
    return logits, torch.where(labels == -100, labels, drawn), upstream


def _forward(fn, **kw):
    return lambda logits, labels, upstream: fn(logits, labels, temperature=0.7, return_entropy=True, **kw)


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
        # The gradient overwrites the logits: Case.check gives each side its own fresh logits.
        out.append(Case("logprobs fwd+bwd in place", shape, make,
                        _forward_backward(fastrlhf.logprobs, inplace_backward=True), backward_refs,
                        3 * logits_bytes, _same_grad))
    # The filtered forward against the sort-based reference (vLLM's apply_top_k_top_p, then min-p): the
    # fused op finds each row's threshold by selection (a few passes over the row) and never sorts.
    tokens, vocab = (256, 8000) if quick else (4096, 32000)
    out.append(Case("logprobs fwd top_k=50 top_p=0.9 min_p=0.05", f"N={tokens} V={vocab} float32",
                    lambda t=tokens, v=vocab: _sampled_inputs(t, v), _forward(fastrlhf.logprobs, **FILTERS),
                    {"sort-based (vLLM)": _forward(reference.logprobs, **FILTERS)}, tokens * vocab * 4,
                    _same_outputs))
    return out


def checks() -> list[Check]:
    grid = [(1, 1), (7, 2), (33, 1000), (5, 40007)]
    return [Check("logprobs", f"N={n} V={v}", dtype,
                  lambda device, n=n, v=v, dtype=dtype: _check(n, v, dtype, device))
            for n, v in grid for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Log-prob, entropy and the logits' gradient of the kernel against float64 on the rounded logits."""
    logits, labels, upstream = _inputs(tokens, vocab, torch.float64, seed=tokens * vocab)
    logits[0, 0] += 20.0  # a peaked row
    logits, upstream = logits.to(dtype).double(), upstream.double()
    temperature = 0.7

    x = logits.to(device=device, dtype=dtype).requires_grad_()
    outs = fastrlhf.logprobs(x, labels.to(device), temperature=temperature, return_entropy=True)
    got = outputs_and_grads(outs, [x], upstream)
    exact_x = logits.clone().requires_grad_()
    exact = outputs_and_grads(reference.logprobs(exact_x, labels, temperature=temperature, return_entropy=True),
                              [exact_x], upstream)
    row, grad_scale = scales(logits / temperature, (logits / temperature).abs(), labels, upstream, temperature)
    compute = compute_dtype(dtype)
    logp, entropy, grad = exact
    return {"logp": within(got[0], logp, bound(logp, row, compute, compute)),
            "entropy": within(got[1], entropy, bound(entropy, row, compute, compute)),
            "grad logits": within(got[2], grad, bound(grad, grad_scale, compute, dtype))}


def scales(z, z_scale, labels, upstream, temperature, ignore_index=-100):
    """Magnitudes the results of ``fastrlhf.logprobs`` are computed from, per row (log-prob and entropy) and
    per element (the gradient of ``sum(upstream[0] * logp + upstream[1] * entropy)`` with respect to the
    logits before the temperature), from the float64 ``z = logits / T`` and ``z_scale >= |z|``, the
    magnitudes each ``z`` is itself computed from.

    With ``lse``, ``d = z - lse``, ``p = e^d`` and the entropy ``H`` of a row: the log-prob and the entropy
    are sums and differences of terms no larger than ``row = |lse| + max z_scale``. A gradient element
    ``(p (a + b d) + [label] g_logp) / T`` with ``a = -(g_logp + g_ent H)``, ``b = -g_ent`` carries ``p``'s
    relative error (``exp`` of ``d``, whose error scales with ``z_scale + row``) and the error of ``H``
    inside ``a``.
    """
    lse = z.logsumexp(-1, keepdim=True)
    d = z - lse
    p = d.exp()
    h = -(p * d).sum(-1, keepdim=True)
    row = lse.abs() + z_scale.amax(-1, keepdim=True)
    g_logp, g_ent = upstream[0, :, None].abs(), upstream[1, :, None].abs()
    at_label = torch.zeros_like(z).scatter_(-1, labels.clamp_min(0)[:, None], 1.0)
    grad = (p * ((g_logp + g_ent * (h.abs() + d.abs())) * (1 + z_scale + row) + g_ent * row)
            + at_label * g_logp) / temperature
    ignored = (labels == ignore_index)[:, None]
    return row[:, 0].masked_fill(ignored[:, 0], 0.0), grad.masked_fill(ignored, 0.0)
