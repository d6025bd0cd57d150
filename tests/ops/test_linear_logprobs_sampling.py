"""fastrlhf.linear_logprobs and linear_policy_loss with the sampler's filters (top_k, top_p, min_p) against the
sort-based float64 reference on the whole logits: log-probs, entropies, kept flags and the gradients of hidden,
weight and bias, on both kernel backends."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.ops import linear_logprobs as linear_module

F64 = torch.float64
IGNORE = -100
FILTERS = [dict(top_k=20), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=50, top_p=0.9, min_p=0.05)]


def inputs(tokens, H, V, seed=0):
    """float64 hidden states, weight and bias giving logits of std ~3; labels with an argmax label (surely kept)
    and an ignored row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * (3.0 / H ** 0.5)
    bias = torch.randn(V, generator=g, dtype=F64)
    labels = torch.randint(0, V, (tokens,), generator=g)
    labels[0] = (hidden[0] @ weight.T + bias).argmax()
    labels[2] = IGNORE
    upstream = torch.randn(2, tokens, generator=g, dtype=F64)
    return hidden, weight, bias, labels, upstream


def run(fn, hidden, weight, bias, labels, upstream, **kw):
    """(logp, entropy, kept, grad hidden, grad weight, grad bias); the loss leaves out labels the sampler
    could not have drawn (their log-prob is -inf), as a trainer masks them."""
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy, kept = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, return_kept=True,
                             **kw)
    loss = (torch.where(kept, logp, 0.0) * upstream[0]).sum() + (entropy * upstream[1]).sum()
    return (logp.detach(), entropy.detach(), kept, *torch.autograd.grad(loss, leaves))


NAMES = ("logp", "entropy", "kept", "grad hidden", "grad weight", "grad bias")


def assert_as_reference(hidden, weight, bias, labels, upstream, **kw):
    got = run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, upstream, **kw)
    kw.pop("chunk_size", None)
    want = run(reference.linear_logprobs, hidden, weight, bias, labels, upstream, **kw)
    for name, x, y in zip(NAMES, got, want):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("filters", FILTERS, ids=[str(f) for f in FILTERS])
def test_matches_sort_reference_float64(kernel_backend, filters, chunk_size):
    tokens, V = (5, 130) if kernel_backend == "triton" else (24, 600)
    if kernel_backend == "triton" and (chunk_size is None or filters is FILTERS[1]):
        pytest.skip("the interpreter is slow: Triton runs chunked, on the single and the combined filters")
    hidden, weight, bias, labels, upstream = inputs(tokens, 16, V, seed=len(filters))
    logp, _, kept, grad_hidden, *_ = assert_as_reference(hidden, weight, bias, labels, upstream, temperature=0.8,
                                                         chunk_size=chunk_size, **filters)
    outside = ~kept
    assert outside.any() and kept[[0, 2]].all(), "labels both inside and outside the kept set"
    assert (logp[outside] == -math.inf).all() and (grad_hidden[outside] == 0).all()


def test_per_row_parameters(kernel_backend):
    """Per-sequence tensors broadcast over the tokens of ``[B, T]`` labels; each filter off in some rows."""
    tokens, V = (6, 90) if kernel_backend == "triton" else (12, 400)
    hidden, weight, bias, labels, upstream = inputs(tokens, 8, V, seed=7)
    T = tokens // 2
    assert_as_reference(hidden.view(2, T, 8), weight, bias, labels.view(2, T), upstream.view(2, 2, T),
                        temperature=torch.tensor([[0.7], [1.2]], dtype=F64), top_k=torch.tensor([[0], [30]]),
                        top_p=torch.tensor([[0.9], [1.0]], dtype=F64), min_p=torch.tensor([[0.1], [0.0]], dtype=F64),
                        chunk_size=4)


def test_low_precision_hidden_decides_on_its_own_logits(kernel_backend):
    """bf16/fp32 hidden: the thresholds come from the logits in hidden's dtype, as the reference's."""
    if kernel_backend == "triton":
        pytest.skip("the Triton interpreter mishandles bf16; fp32 is covered by the float64 cases' kernels")
    hidden, weight, bias, labels, upstream = inputs(16, 32, 500, seed=8)
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b = (t.to(dtype) for t in (hidden, weight, bias))
        got = run(fastrlhf.linear_logprobs, h, w, b, labels, upstream.float(), top_k=40, top_p=0.9, chunk_size=5)
        want = run(reference.linear_logprobs, h, w, b, labels, upstream.float(), top_k=40, top_p=0.9)
        assert torch.equal(got[2], want[2]), dtype
        torch.testing.assert_close(got[0], want[0], msg=lambda m: f"{dtype} logp: {m}")


def test_backward_recomputes_the_forwards_chunks(monkeypatch):
    """With filters the backward walks the forward's token chunks (the same GEMMs, the same bits, so the token
    at each threshold stays kept), never vocab slices; without filters it takes vocab slices."""
    hidden, weight, bias, labels, upstream = inputs(20, 8, 100, seed=9)
    calls = []
    chunk_logits = linear_module._chunk_logits

    def recorded(hidden, weight, bias, step, by_vocab=False):
        calls.append((step, by_vocab))
        return chunk_logits(hidden, weight, bias, step, by_vocab)

    monkeypatch.setattr(linear_module, "_chunk_logits", recorded)
    run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, upstream, top_p=0.9, chunk_size=6)
    assert calls == [(6, False), (6, False)]
    calls.clear()
    run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, upstream, chunk_size=6)
    assert calls == [(6, False), (30, True)]


def test_gradcheck_float64_kept_set_away_from_its_boundary(kernel_backend):
    """Well separated logits (identity weight): finite differences never move a token across a threshold.
    Interpreted Triton checks one random direction per input (fast_mode): a full Jacobian is minutes there."""
    hidden = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                           [8.0, 6.5, 5.0, 3.5, 2.0, 0.5, -1.0, -2.5, -4.0]], dtype=F64) * 0.6
    weight = torch.eye(9, dtype=F64) + 0.01 * torch.ones(9, 9, dtype=F64)
    bias = torch.linspace(0.0, 0.04, 9, dtype=F64)
    labels = torch.tensor([6, 1])
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    torch.autograd.gradcheck(lambda h, w, b: fastrlhf.linear_logprobs(h, w, labels, bias=b, top_k=5, top_p=0.97,
                                                                      return_entropy=True, chunk_size=1), leaves,
                             fast_mode=kernel_backend == "triton")


def test_opcheck(kernel_backend):
    hidden, weight, bias, labels, upstream = inputs(9, 6, 23, seed=10)
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    filters = (torch.tensor([3, 0, 40, 5, 1, 2, 0, 0, 9]), torch.full((9,), 0.8), torch.full((9,), 0.02))
    fwd = (h, w, b, labels, torch.full((9,), 1.25), *filters, IGNORE, 4, 5)
    torch.library.opcheck(torch.ops.fastrlhf.linear_logprobs_forward, fwd)
    _, entropy, lse, threshold, _ = torch.ops.fastrlhf.linear_logprobs_forward(h.detach(), w.detach(), b.detach(),
                                                                               *fwd[3:])
    assert threshold.shape == (9,) and threshold.isfinite().all()
    g = upstream.float()
    bwd = (h.detach(), w.detach(), b.detach(), labels, fwd[4], threshold, lse, entropy, g[0], g[1], IGNORE, 4, 5,
           [True, True, True])
    torch.library.opcheck(torch.ops.fastrlhf.linear_logprobs_backward, bwd)


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels, upstream = inputs(10, 8, 120, seed=11)
    top_p = torch.linspace(0.5, 1.0, 10, dtype=F64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def compiled(h, w, labels, *, bias, **kw):
        return fastrlhf.linear_logprobs(h, w, labels, bias=bias, **kw)

    got = run(compiled, hidden, weight, bias, labels, upstream, top_k=30, top_p=top_p, min_p=0.01, chunk_size=4)
    want = run(reference.linear_logprobs, hidden, weight, bias, labels, upstream, top_k=30, top_p=top_p, min_p=0.01)
    for name, x, y in zip(NAMES, got, want):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name,filters,error", [("top_p", dict(top_p=-0.1), ValueError),
                                                ("top_k", dict(top_k=2.5), TypeError),
                                                ("min_p", dict(min_p=torch.ones(3)), ValueError)])
def test_bad_filters_name_the_argument(name, filters, error):
    hidden, weight, bias, labels, _ = inputs(6, 4, 9, seed=12)
    with pytest.raises(error, match=name):
        fastrlhf.linear_logprobs(hidden, weight, labels, **filters)


@pytest.mark.parametrize("loss_type,extra,masked", [("ppo", dict(entropy_coef=0.01), False), ("ppo", {}, True),
                                                     ("gspo", {}, True)])
def test_linear_policy_loss_matches_reference(loss_type, extra, masked):
    """The policy loss of the kept distribution; a scored label outside the kept set gets no gradient (ppo's
    loss is finite there; gspo's sequence ratio needs such tokens masked, as the docstring says)."""
    hidden, weight, bias, labels, _ = inputs(24, 12, 300, seed=13)
    g = torch.Generator().manual_seed(14)
    old_logp = -torch.rand(24, generator=g, dtype=F64) * 3
    advantages = torch.randn(24, generator=g, dtype=F64)
    filters = dict(top_k=torch.tensor([[40], [0], [25], [60]]), top_p=0.9, min_p=0.01)
    _, kept = reference.linear_logprobs(hidden.view(4, 6, 12), weight, labels.view(4, 6), bias=bias,
                                        return_kept=True, **filters)
    assert not kept.all() and kept.view(-1)[0]
    results = []
    for fn in (fastrlhf.linear_policy_loss, reference.linear_policy_loss):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, _, logp = fn(leaves[0].view(4, 6, 12), leaves[1], labels.view(4, 6), old_logp.view(4, 6),
                           advantages.view(4, 6), kept if masked else None, bias=leaves[2], return_logp=True,
                           loss_type=loss_type, chunk_size=5, **filters, **extra)
        results.append((loss.detach(), logp, *torch.autograd.grad(loss, leaves)))
    assert results[1][0].isfinite()
    assert torch.equal(results[0][1] == -math.inf, ~kept)
    for name, x, y in zip(("loss", "logp", "grad hidden", "grad weight", "grad bias"), *results):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")


def test_linear_policy_loss_torch_compile_fullgraph():
    hidden, weight, bias, labels, _ = inputs(12, 8, 150, seed=15)
    old_logp, advantages = -torch.rand(12, dtype=F64), torch.randn(12, dtype=F64)
    top_p = torch.tensor([[0.8], [0.95]], dtype=F64)

    def loss(h, w, b):
        return fastrlhf.linear_policy_loss(h.view(2, 6, 8), w, labels.view(2, 6), old_logp.view(2, 6),
                                           advantages.view(2, 6), bias=b, top_k=40, top_p=top_p, min_p=0.01,
                                           chunk_size=5, entropy_coef=0.01)[0]

    results = []
    for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        value = fn(*leaves)
        results.append((value.detach(), *torch.autograd.grad(value, leaves)))
    for name, x, y in zip(("loss", "grad hidden", "grad weight", "grad bias"), *results):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")
