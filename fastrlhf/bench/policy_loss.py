"""Benchmark cases and verification checks of ``fastrlhf.policy_loss`` (``fastrlhf/ops/policy_loss.py``)."""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check, bound, compute_dtype, within

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
    grid = [(1, 1), (4, 100), (3, 1100)]
    return [Check("policy_loss", f"B={B} T={T} ppo dual-clip k3 entropy token-mean", dtype,
                  lambda device, B=B, T=T, dtype=dtype: _check(B, T, dtype, device))
            for B, T in grid for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def magnitudes(logp, old, ref, adv, entropy_scale, weight, options, logp_scale=0.0):
    """Per token (float64): the magnitudes its loss terms and its ``d loss / d logp`` are computed from, for
    a ppo loss with the k3 KL and the entropy bonus of ``options``, each token's aggregation ``weight``.

    The ratio ``r = exp(d)``, ``d = logp - old``, carries the rounding of d (``|d|``) and the error of logp
    itself (``logp_scale``: the magnitudes logp is computed from; 0 when it is an input) besides its own; so
    does k3's ``exp(k)``, ``k = ref - logp``. ``entropy_scale``: those of the entropy (``|H|`` for an input).
    """
    d, k = logp - old, ref - logp
    r, e = d.clamp(-20, 20).exp(), k.clamp(-20, 20).exp()
    r_scale, e_scale = r * (2 + d.abs() + logp_scale), e * (2 + k.abs() + logp_scale)
    clipped = 1 + options.get("clip_high", 0.2) + (options.get("dual_clip") or 0.0)
    policy = adv.abs() * (r_scale + clipped)
    kl = e_scale + k.abs() + 1
    loss = weight * (policy + options["kl_coef"] * kl + options["entropy_coef"] * entropy_scale)
    grad = weight * (adv.abs() * r_scale + options["kl_coef"] * (1 + e_scale))
    return loss, grad


def _check(B: int, T: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """The loss and the gradients of logp and entropy against float64 on the rounded inputs."""
    logp, entropy, old, adv, ref, mask = (x.detach().to(dtype).double() if x.is_floating_point() else x
                                          for x in inputs(B, T, torch.float64, seed=B * T))

    def run(fn, dt, dev):
        leaves = [x.to(device=dev, dtype=dt).requires_grad_() for x in (logp, entropy)]
        loss, _, grads = _train_step(fn, **OPTIONS)(*leaves, *(x.to(device=dev, dtype=dt) for x in (old, adv, ref)),
                                                     mask.to(dev))
        return [t.detach().cpu() for t in (loss, *grads)]

    got = run(fastrlhf.policy_loss, dtype, device)
    exact = run(reference.policy_loss, torch.float64, "cpu")
    weight = mask / mask.sum()  # token-mean
    loss_terms, grad_logp = magnitudes(logp, old, ref, adv, entropy.abs(), weight, OPTIONS)
    # The loss sums n tokens, each added into one of 8 lanes (C++) or a tree (Triton), lanes and blocks
    # combined after: at most n / 8 + 16 additions deep, each a rounding of at most the sum of magnitudes.
    loss_scale = (mask.sum() / 8 + 16) * loss_terms.sum()
    grad_entropy = weight * OPTIONS["entropy_coef"]
    compute = compute_dtype(dtype)
    names = ("loss", "grad logp", "grad entropy")
    scales = (loss_scale, grad_logp, grad_entropy)
    stored = (compute, dtype, dtype)
    return {n: within(g, x, bound(x, sc, compute, st)) for n, g, x, sc, st in zip(names, got, exact, scales, stored)}
