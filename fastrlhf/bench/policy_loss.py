"""Benchmark cases and verification checks of ``fastrlhf.policy_loss`` (``fastrlhf/ops/policy_loss.py``)."""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check

# Per token, forward + backward, each input read once and each output written once: logp, old_logp,
# advantages, ref_logp, entropy (fp32), the mask (bool) read; the gradients of logp and entropy written.
BYTES_PER_TOKEN = 5 * 4 + 1 + 2 * 4
OPTIONS = dict(loss_type="ppo", dual_clip=3.0, kl_coef=0.001, kl_estimator="k3", entropy_coef=0.01,
               aggregation="token-mean")


def inputs(B: int, T: int, dtype=torch.float32, seed=0):
    """(logp, entropy) leaves that need a gradient, then old_logp, advantages, ref_logp and a right-padded
    mask (half to all of T per row)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.2).to(dtype).requires_grad_()
    ref = (old + torch.randn(B, T, generator=g) * 0.2).to(dtype)
    entropy = (torch.rand(B, T, generator=g) * 2).to(dtype).requires_grad_()
    adv = torch.randn(B, T, generator=g).to(dtype)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, entropy, old.to(dtype), adv, ref, mask


def _train_step(loss_fn, **options):
    """Forward and backward: the loss, the metrics and the gradients of logp and entropy."""
    def step(logp, entropy, old, adv, ref, mask):
        loss, metrics = loss_fn(logp, old, adv, mask, ref_logp=ref, entropy=entropy, **options)
        return loss, metrics, torch.autograd.grad(loss, (logp, entropy))
    return step


def _same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-9)


def cases(quick: bool) -> list[Case]:
    shapes = [(64, 1024)] if quick else [(64, 1024), (512, 4096)]
    return [Case("policy_loss fwd+bwd", f"B={B} T={T} fp32 ppo dual-clip k3 entropy token-mean",
                 lambda B=B, T=T: inputs(B, T), _train_step(fastrlhf.policy_loss, **OPTIONS),
                 {"plain torch (verl-style)": _train_step(reference.policy_loss, **OPTIONS)},
                 BYTES_PER_TOKEN * B * T, _same, x=B * T) for B, T in shapes]


def checks() -> list[Check]:
    """None yet: ``fastrlhf verify`` bounds each output by the magnitudes it is computed from
    (``fastrlhf.bench.case.bound``), and those scales are not derived for this op yet. Its tests
    (tests/ops/test_policy_loss.py) check every backend against the float64 reference."""
    return []
