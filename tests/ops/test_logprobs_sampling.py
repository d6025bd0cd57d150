"""fastrlhf.logprobs with the sampler's filters (top_k, top_p, min_p) against the sort-based float64
reference: log-probs, entropies and gradients of the kept distribution, labels outside it, return_kept."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import reference

F64 = torch.float64


def inputs(rows, V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g, dtype=F64) * scale
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[0] = logits[0].argmax()  # at least one label surely kept
    if rows > 2:
        labels[2] = -100
    upstream = torch.randn(2, rows, generator=g, dtype=F64)
    return logits, labels, upstream


def run(fn, logits, labels, upstream, **kw):
    x = logits.clone().requires_grad_()
    logp, entropy, kept = fn(x, labels, return_entropy=True, return_kept=True, **kw)
    loss = (torch.where(kept, logp, 0.0) * upstream[0]).sum() + (entropy * upstream[1]).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), entropy.detach(), kept, grad


def assert_as_reference(logits, labels, upstream, **kw):
    got = run(fastrlhf.logprobs, logits, labels, upstream, **kw)
    want = run(reference.logprobs, logits, labels, upstream, **kw)
    for name, x, y in zip(("logp", "entropy", "kept", "grad"), got, want):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")
    return got


FILTERS = [dict(top_k=20), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=50, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("filters", FILTERS, ids=[str(f) for f in FILTERS])
def test_matches_sort_reference_float64(kernel_backend, filters):
    rows, V = (3, 300) if kernel_backend == "triton" else (12, 2000)
    logits, labels, upstream = inputs(rows, V, seed=len(filters))
    logp, _, kept, grad = assert_as_reference(logits, labels, upstream, temperature=0.8, **filters)
    outside = ~kept
    if kernel_backend == "cpp":
        assert outside.any() and kept[[0, 2]].all(), "labels both inside and outside the kept set"
    assert (logp[outside] == -math.inf).all() and (grad[outside] == 0).all()


def test_per_row_parameters(kernel_backend):
    logits, labels, upstream = inputs(6, 400, seed=7)
    logits, labels = logits.view(2, 3, 400), labels.view(2, 3)
    assert_as_reference(logits, labels, upstream.view(2, 2, 3), temperature=torch.tensor([[0.7], [1.2]], dtype=F64),
                        top_k=torch.tensor([[0], [30]]), top_p=torch.tensor([0.9, 1.0, 0.5], dtype=F64),
                        min_p=torch.tensor([[0.1], [0.0]], dtype=F64))


def test_fp32_logits(kernel_backend):
    logits, labels, upstream = inputs(4, 500, seed=8)
    x = logits.float()
    got = run(fastrlhf.logprobs, x, labels, upstream.float(), top_k=40, top_p=0.9)
    want = run(reference.logprobs, x.double(), labels, upstream, top_k=40, top_p=0.9)
    assert torch.equal(got[2], want[2])
    for name, a, b in zip(("logp", "entropy", "grad"), (got[0], got[1], got[3]), (want[0], want[1], want[3])):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64_kept_set_away_from_its_boundary():
    """Well separated logits: finite differences never move a token across a threshold."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                           [8.0, 6.5, 5.0, 3.5, 2.0, 0.5, -1.0, -2.5, -4.0]], dtype=F64) * 0.6
    labels = torch.tensor([6, 1])
    x = logits.clone().requires_grad_()
    torch.autograd.gradcheck(lambda x: fastrlhf.logprobs(x, labels, top_k=5, top_p=0.97, return_entropy=True), (x,))


def test_no_filters_unchanged_and_kept_all_true(kernel_backend):
    logits, labels, _ = inputs(4, 200, seed=9)
    logp, kept = fastrlhf.logprobs(logits, labels, return_kept=True)
    assert torch.equal(logp, fastrlhf.logprobs(logits, labels)) and kept.all()


def test_process_group_with_filters_is_refused():
    logits, labels, _ = inputs(2, 50, seed=10)
    with pytest.raises(ValueError, match="top_k, top_p, min_p: not supported with process_group"):
        fastrlhf.logprobs(logits, labels, top_p=0.9, process_group=object())


def test_torch_compile_fullgraph():
    logits, labels, upstream = inputs(5, 300, seed=11)
    top_p = torch.tensor([0.9, 0.8, 1.0, 0.5, 0.95], dtype=F64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(x):
        logp, entropy, kept = fastrlhf.logprobs(x, labels, top_k=30, top_p=top_p, min_p=0.01, return_entropy=True,
                                                return_kept=True)
        return (torch.where(kept, logp, 0.0) * upstream[0]).sum() + (entropy * upstream[1]).sum()

    x = logits.clone().requires_grad_()
    got = loss(x)
    xr = logits.clone().requires_grad_()
    logp, entropy, kept = reference.logprobs(xr, labels, top_k=30, top_p=top_p, min_p=0.01, return_entropy=True,
                                             return_kept=True)
    want = (torch.where(kept, logp, 0.0) * upstream[0]).sum() + (entropy * upstream[1]).sum()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, xr)[0])
