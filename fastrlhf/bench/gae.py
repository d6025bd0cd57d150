"""Benchmark cases and verification checks of ``fastrlhf.gae`` and ``fastrlhf.masked_whiten``."""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check, bound, compute_dtype, outputs_and_grads, within

# Per element: rewards and values read (fp32), the mask read (bool), advantages and returns written.
BYTES_PER_ELEMENT = 4 + 4 + 1 + 4 + 4


def _inputs(B: int, T: int, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g).to(dtype=dtype, device=device)
    values = torch.randn(B, T, generator=g).to(dtype=dtype, device=device)
    # Right padding: each response holds between half and all of T tokens.
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return rewards, values, mask


def _whitened(gae, whiten):
    def run(rewards, values, mask):
        advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
        return whiten(advantages, mask), returns
    return run


def _same(got, want):
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def cases(quick: bool) -> list[Case]:
    shapes = [(256, 256), (256, 2048)] if quick else [(256, 128), (256, 512), (256, 2048), (64, 8192), (16, 32768)]
    out = []
    for B, T in shapes:
        make = lambda B=B, T=T: _inputs(B, T)  # noqa: E731
        out.append(Case("gae", f"B={B} T={T} fp32", make,
                        lambda r, v, m: fastrlhf.gae(r, v, m, gamma=1.0, lam=0.95),
                        {"verl loop": lambda r, v, m: reference.gae(r, v, m, gamma=1.0, lam=0.95)},
                        BYTES_PER_ELEMENT * B * T, _same, x=T))
        out.append(Case("gae + masked_whiten", f"B={B} T={T} fp32", make,
                        _whitened(fastrlhf.gae, fastrlhf.masked_whiten),
                        {"verl loop + whiten": _whitened(reference.gae, reference.masked_whiten)},
                        BYTES_PER_ELEMENT * B * T, _same, x=T))
    return out


def checks() -> list[Check]:
    grid = [(1, 1), (4, 100), (3, 1100)]
    return [Check("gae", f"B={B} T={T}", dtype, lambda device, B=B, T=T, dtype=dtype: _check(B, T, dtype, device))
            for B, T in grid for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(B: int, T: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Outputs and gradients of the kernel against float64 on the rounded inputs."""
    rewards, values, mask = _inputs(B, T, torch.float64, seed=B * T)
    rewards, values = rewards.to(dtype).double(), values.to(dtype).double()
    dones = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.02
    g = torch.Generator().manual_seed(2)
    # Autograd hands the kernel the upstream gradients in the outputs' dtype: the exact answer uses them rounded.
    upstream = [torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2)]
    options = {"dones": dones, "gamma": 0.99, "lam": 0.95}

    def run(fn, dt, dev, r, v, grads):
        leaves = [x.to(dtype=dt, device=dev).requires_grad_() for x in (r, v)]
        outs = fn(*leaves, mask.to(dev), **{k: x.to(dev) if torch.is_tensor(x) else x for k, x in options.items()})
        return outputs_and_grads(outs, leaves, grads)

    got = run(fastrlhf.gae, dtype, device, rewards, values, upstream)
    exact = run(reference.gae, torch.float64, "cpu", rewards, values, upstream)
    # Magnitudes: the advantage chain run on |r| + |v| + gamma max|v| (a bound on each |delta|'s terms)
    # and its adjoint run on |upstream| (the chain's coefficients are products of gamma lam >= 0). A value
    # enters the delta at its own step and, times gamma, the one before: bounded by the running maximum.
    vmax = values.abs().amax(1, keepdim=True)
    scale_adv, _, scale_grad_r, _ = run(reference.gae, torch.float64, "cpu", rewards.abs() + values.abs() + 0.99 * vmax,
                                        torch.zeros_like(values), [u.abs() for u in upstream])
    scale_grad_v = 1.99 * scale_grad_r.cummax(1).values + upstream[1].abs()
    compute = compute_dtype(dtype)
    scales = (scale_adv, scale_adv + values.abs(), scale_grad_r, scale_grad_v)
    names = ("advantages", "returns", "grad rewards", "grad values")
    return {n: within(g, e, bound(e, sc, compute, dtype)) for n, g, e, sc in zip(names, got, exact, scales)}
