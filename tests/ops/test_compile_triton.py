"""``torch.compile(fullgraph=True)`` over ops on the Triton backend (the interpreter on CPU tensors here):
the compiled graph calls the registered ops, whose kernels are the Triton ones, forward and backward,
against the float64 reference."""

import importlib
from unittest import mock

import pytest
import torch

import fastrlhf
from fastrlhf import backend, reference

pytest.importorskip("triton")


def _spied(op: str, *launchers: str):
    """Context managers that count the calls of ``fastrlhf.kernels.<op>``'s launchers (still running them)."""
    module = importlib.import_module(f"fastrlhf.kernels.{op}")
    return [mock.patch.object(module, name, wraps=getattr(module, name)) for name in launchers]


def _run_spied(op, launchers, fn):
    patches = _spied(op, *launchers)
    spies = [p.start() for p in patches]
    try:
        with backend.use_backend("triton"):
            out = fn()
    finally:
        for p in patches:
            p.stop()
    for name, spy in zip(launchers, spies):
        assert spy.call_count >= 1, f"{op}.{name} was not launched"
    return out


def _grads_of(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_gae_forward_and_backward(compiler):
    g = torch.Generator().manual_seed(0)
    r, v = (torch.randn(3, 20, generator=g) for _ in range(2))
    mask = torch.rand(3, 20, generator=g) > 0.2
    dones = torch.rand(3, 20, generator=g) < 0.1
    compiled = torch.compile(lambda r, v: fastrlhf.gae(r, v, mask, dones=dones, gamma=0.99, lam=0.95),
                             fullgraph=True, backend=compiler)

    def run():
        leaves = [x.clone().requires_grad_() for x in (r, v)]
        outs = compiled(*leaves)
        return outs, _grads_of(outs, leaves, 1)

    outs, grads = _run_spied("gae", ("gae_forward", "gae_backward"), run)
    exact_leaves = [x.double().requires_grad_() for x in (r, v)]
    exact = reference.gae(*exact_leaves, mask, dones=dones, gamma=0.99, lam=0.95)
    exact_grads = _grads_of(exact, exact_leaves, 1)
    for got, want in zip((*outs, *grads), (*exact, *exact_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_logprobs_forward_and_backward(compiler):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 37, generator=g) * 3
    labels = torch.randint(0, 37, (2, 4), generator=g)
    labels[0, 1] = -100
    compiled = torch.compile(lambda x: fastrlhf.logprobs(x[:, :-1], labels, temperature=0.7, return_entropy=True),
                             fullgraph=True, backend=compiler)

    def run():
        x = logits.clone().requires_grad_()
        outs = compiled(x)
        return outs, _grads_of(outs, [x], 3)

    outs, grads = _run_spied("logprobs", ("logprobs_forward", "logprobs_backward"), run)
    x = logits.double().requires_grad_()
    exact = reference.logprobs(x[:, :-1], labels, temperature=0.7, return_entropy=True)
    exact_grads = _grads_of(exact, [x], 3)
    for got, want in zip((*outs, *grads), (*exact, *exact_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_dpo_loss_forward_and_backward(compiler):
    g = torch.Generator().manual_seed(4)
    logps = [torch.randn(16, generator=g) * 10 for _ in range(4)]
    compiled = torch.compile(lambda *xs: fastrlhf.dpo_loss(*xs, beta=0.1, loss_type="robust", label_smoothing=0.1)[0],
                             fullgraph=True, backend=compiler)

    def run():
        leaves = [x.clone().requires_grad_() for x in logps]
        loss = compiled(*leaves)
        return loss, torch.autograd.grad(loss, leaves)

    loss, grads = _run_spied("pairwise", ("pairwise_forward",), run)
    leaves = [x.double().requires_grad_() for x in logps]
    exact = reference.dpo_loss(*leaves, beta=0.1, loss_type="robust", label_smoothing=0.1)[0]
    for got, want in zip((loss, *grads), (exact, *torch.autograd.grad(exact, leaves))):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
