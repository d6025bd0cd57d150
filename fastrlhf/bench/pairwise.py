"""Benchmark cases and verification checks of the pairwise losses (``fastrlhf/ops/pairwise.py``)."""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check, bound, compute_dtype, outputs_and_grads, within

# Per token of each side, forward + backward: the mask read (bool) and the values' gradient written (fp32).
BYTES_PER_TOKEN = 1 + 4


def reward_model_inputs(B: int, T: int, dtype=torch.float32, seed=0, side="right"):
    """Values of both sides (leaves that need a gradient) and masks padded on ``side`` (half to all of T)."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2)]
    masks = []
    for _ in range(2):
        lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
        cols = torch.arange(T)[None, :]
        masks.append(cols < lengths[:, None] if side == "right" else cols >= T - lengths[:, None])
    return (*values, *masks)


def _train_step(loss_fn, **options):
    """Forward and backward of ``loss_fn``: the loss, its stats and the gradients of both values."""
    def step(chosen, rejected, chosen_mask, rejected_mask):
        loss, stats = loss_fn(chosen, rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask, **options)
        return loss, stats, torch.autograd.grad(loss, (chosen, rejected))
    return step


def _same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)


def cases(quick: bool) -> list[Case]:
    sizes = [64, 256] if quick else [64, 256, 1024, 4096]
    T = 2048
    return [Case("reward_model_loss fwd+bwd", f"B={B} T={T} fp32", lambda B=B: reward_model_inputs(B, T),
                 _train_step(fastrlhf.reward_model_loss),
                 {"gather + logsigmoid + metrics": _train_step(reference.reward_model_loss)},
                 2 * BYTES_PER_TOKEN * B * T, _same, x=B) for B in sizes]


def checks() -> list[Check]:
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out.append(Check("pairwise_sigmoid_loss", "B=1000 margin eps=0.1", dtype,
                         lambda device, dtype=dtype: _check_pairs(_pairwise, 3, dtype, device)))
        for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
            out.append(Check("dpo_loss", f"B=1000 {loss_type}", dtype,
                             lambda device, dtype=dtype, t=loss_type: _check_pairs(_dpo(t), 4, dtype, device)))
        out.append(Check("reward_model_loss", "B=8 T=300 left-padded, center, lm", dtype,
                         lambda device, dtype=dtype: _check_reward_model(dtype, device)))
    return out


def _pairwise(fn, chosen, rejected, margin, reduction="mean"):
    return fn(chosen, rejected, margin=margin, beta=0.5, label_smoothing=0.1, reduction=reduction)


def _dpo(loss_type):
    def run(fn, *logps, reduction="mean"):
        smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
        return fn(*logps, beta=0.1, loss_type=loss_type, label_smoothing=smoothing, reduction=reduction)[0]
    return run


def _check_pairs(run, count, dtype, device):
    g = torch.Generator().manual_seed(count)
    # Log-prob-sized gaps: |beta h| spans the saturated tails as well as the centre.
    leaves = [(torch.randn(1000, generator=g, dtype=torch.float64) * 20).to(dtype).double() for _ in range(count)]
    fused = fastrlhf.pairwise_sigmoid_loss if run is _pairwise else fastrlhf.dpo_loss
    plain = reference.pairwise_sigmoid_loss if run is _pairwise else reference.dpo_loss
    # The per-pair losses may have either sign (robust): the loss's terms are their magnitudes.
    terms = run(plain, *leaves, reduction="none").abs().mean()
    return _errors(run, fused, plain, leaves, terms, dtype, device)


def _check_reward_model(dtype, device):
    chosen, rejected, chosen_mask, rejected_mask = reward_model_inputs(8, 300, torch.float64, seed=5, side="left")
    logprobs = -torch.rand(8, 300, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 5
    margin = torch.rand(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype).double()

    def run(fn, chosen, rejected, logprobs):
        return fn(chosen, rejected, chosen_mask=chosen_mask.to(chosen.device), rejected_mask=rejected_mask.to(
            chosen.device), margin=margin.to(chosen), center_coef=0.01, chosen_logprobs=logprobs, lm_coef=0.5)[0]

    leaves = [x.detach().to(dtype).double() for x in (chosen, rejected, logprobs)]
    # Every term has one sign (softplus, a square, minus the mean of log-probs <= 0): |loss| is their sum.
    terms = run(reference.reward_model_loss, *leaves).abs()
    return _errors(run, fastrlhf.reward_model_loss, reference.reward_model_loss, leaves, terms, dtype, device)


def _errors(run, fused, plain, leaves, terms, dtype, device):
    """Loss and gradients of the kernel (on ``device``, in ``dtype``) against float64 on the rounded ``leaves``.

    Bounds: the loss carries the rounding of its terms (``terms``: the sum of their magnitudes) and of each
    input, ``sum_k |dL/dx_k| |x_k|``; a gradient ``g_j`` carries its own rounding and each input's,
    ``sum_k |H_jk| |x_k|``, where every block ``H_jk`` of the Hessian is diagonal (each pair's loss depends
    on that pair's inputs only), so ``|H_jk| |x_k| = |H_jk |x_k||``, a Hessian-vector product.
    """
    xs = [x.to(device=device, dtype=dtype).requires_grad_() for x in leaves]
    got = outputs_and_grads([run(fused, *xs)], xs, [torch.tensor(1.0)])
    exact_xs = [x.clone().requires_grad_() for x in leaves]
    loss = run(plain, *exact_xs)
    grads = torch.autograd.grad(loss, exact_xs, create_graph=True)
    hessian_terms = [torch.zeros_like(x) for x in leaves]
    for g_k, x_k in zip(grads, leaves):
        if g_k.requires_grad:
            for j, h in enumerate(torch.autograd.grad((g_k * x_k.abs()).sum(), exact_xs, retain_graph=True,
                                                      allow_unused=True)):
                if h is not None:
                    hessian_terms[j] += h.abs()
    compute = compute_dtype(dtype)
    exact = [loss.detach(), *(g.detach() for g in grads)]
    scales = [terms + sum((g.abs() * x.abs()).sum() for g, x in zip(exact[1:], leaves)),
              *(g.abs() + h for g, h in zip(exact[1:], hessian_terms))]
    names = ["loss", *(f"grad {k}" for k in range(len(leaves)))]
    return {n: within(g, e, bound(e, sc, compute, torch.float32 if n == "loss" else dtype))
            for n, g, e, sc in zip(names, got, exact, scales)}
