"""Benchmark cases and verification checks of ``fastrlhf.linear_policy_loss``.

Each case times a forward and backward from hidden states (ppo, k3 KL to a reference policy, entropy bonus,
token-mean) of the fused op against the unfused path a trainer writes (``hidden @ weight.T``,
``log_softmax``, ``gather``, the entropy, the plain-torch policy loss) and, when liger-kernel is installed,
against Liger's ``LigerFusedLinearGRPOLoss`` (its GRPO loss with ``loss_type="dapo"``, token-level
importance sampling and ``beta`` for the KL: the same loss without the entropy term, which Liger lacks).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import K, Case, Check, bound, compute_dtype, within
from fastrlhf.bench.logprobs import scales
from fastrlhf.bench.policy_loss import magnitudes

OPTIONS = dict(loss_type="ppo", clip_low=0.2, clip_high=0.2, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


def _inputs(tokens: int, hidden: int, vocab: int, dtype=torch.float32, seed=0):
    """Four sequences of ``tokens / 4`` tokens: hidden states, lm_head, sampled labels, one advantage per
    sequence (as GRPO gives them), and old/reference log-probs near the current policy's (ratios around 1,
    a few clipped)."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, tokens // 4)
    h = torch.randn(*shape, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * (3.0 / hidden ** 0.5)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=g)
    with torch.no_grad():
        logp = fastrlhf.linear_logprobs(h, w, labels)
    old_logp = logp + 0.1 * torch.randn(shape, generator=g)
    ref_logp = logp + 0.1 * torch.randn(shape, generator=g)
    advantages = torch.randn(shape[0], generator=g)
    return h, w, labels, old_logp, advantages, ref_logp


def fused(entropy_coef):
    """(loss, grad hidden, grad weight) of fastrlhf.linear_policy_loss."""
    def run(h, w, labels, old_logp, advantages, ref_logp):
        loss, _ = fastrlhf.linear_policy_loss(h, w, labels, old_logp, advantages, ref_logp=ref_logp,
                                              **{**OPTIONS, "entropy_coef": entropy_coef})
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    return run


def unfused(entropy_coef):
    """The whole logits tensor, ``log_softmax``, ``gather`` and the entropy, then the plain-torch loss."""
    def run(h, w, labels, old_logp, advantages, ref_logp):
        logp_all = F.linear(h, w).float().log_softmax(-1)
        logp = torch.gather(logp_all, -1, labels[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1) if entropy_coef else None
        loss, _ = reference.policy_loss(logp, old_logp, advantages, ref_logp=ref_logp, entropy=entropy,
                                        **{**OPTIONS, "entropy_coef": entropy_coef})
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    return run


def liger(h, w, labels, old_logp, advantages, ref_logp):
    """Liger's chunked GRPO loss (one sequence per chunk) with the same clipping, token-mean aggregation
    (``dapo``) and k3 KL; it has no entropy term."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=OPTIONS["kl_coef"], loss_type="dapo", epsilon_low=OPTIONS["clip_low"],
                                       epsilon_high=OPTIONS["clip_high"], use_ref_model=True)
    loss, _ = loss_fn(h, w, labels, torch.ones_like(labels), advantages, ref_per_token_logps=ref_logp,
                      old_per_token_logps=old_logp)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def _same(got, want):
    for name, x, y in zip(("loss", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def cases(quick: bool) -> list[Case]:
    tokens, hidden, vocab = (512, 256, 8000) if quick else (4096, 1024, 32000)
    # Floor: hidden and weight read, their gradients written, the per-token inputs read.
    floor = 4 * 2 * (tokens + vocab) * hidden + tokens * 24
    out = []
    # With the entropy bonus (the case) against the unfused path; without it also against Liger,
    # which has no entropy term.
    for entropy_coef in (OPTIONS["entropy_coef"], 0.0):
        references = {"unfused log_softmax+loss": unfused(entropy_coef)}
        if entropy_coef == 0 and importlib.util.find_spec("liger_kernel") is not None:
            references["Liger LigerFusedLinearGRPOLoss"] = liger
        out.append(Case(f"linear_policy_loss fwd+bwd{' (no entropy)' if entropy_coef == 0 else ''}",
                        f"N={tokens} H={hidden} V={vocab} fp32",
                        lambda t=tokens, h=hidden, v=vocab: _inputs(t, h, v), fused(entropy_coef), references,
                        floor, _same, x=tokens))
    return out


def checks() -> list[Check]:
    grid = [(4, 8, 5), (40, 24, 301), (128, 64, 1000)]
    return [Check("linear_policy_loss", f"N={n} H={h} V={v} ppo k3 entropy token-mean", dtype,
                  lambda device, n=n, h=h, v=v, dtype=dtype: _check(n, h, v, dtype, device))
            for n, h, v in grid for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The loss and the gradients of hidden and weight against float64 on the rounded inputs."""
    h, w, labels, old, adv, ref = (x.detach() for x in _inputs(tokens, hidden, vocab, torch.float64, seed=tokens))
    h, w = h.to(dtype).double(), w.to(dtype).double()
    old, ref = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype), ref
    labels[0, 1::3] = -100  # ignored tokens: masked out of the loss

    def run(fn, dt, dev):
        leaves = [x.to(device=dev, dtype=dt).requires_grad_() for x in (h, w)]
        loss, _ = fn(*leaves, labels.to(dev), old.to(dev), adv.to(dev), ref_logp=ref.to(dev), chunk_size=16,
                     **OPTIONS)
        return [t.detach().cpu() for t in (loss, *torch.autograd.grad(loss, leaves))]

    got = run(fastrlhf.linear_policy_loss, dtype, device)
    exact = run(reference.linear_policy_loss, torch.float64, "cpu")
    # The log-probs and entropies carry what linear_logprobs' check bounds (``row``: the magnitudes of
    # each); the policy loss's magnitudes then take logp's (policy_loss's check). The logits' gradient
    # has the policy gradient g and the entropy's as upstream, plus g's own error, which reaches every
    # logit of its row through (onehot - p); the gradient GEMMs then as in linear_logprobs' check.
    z = torch.nn.functional.linear(h, w).flatten(0, 1).requires_grad_()
    flat_labels = labels.flatten()
    logp, entropy = reference.logprobs(z, flat_labels, return_entropy=True)
    compute = compute_dtype(dtype)
    stored_logits = torch.finfo(dtype).eps / (2 * K * torch.finfo(compute).eps)
    z_scale = h.abs().flatten(0, 1) @ w.abs().T + stored_logits * z.detach().abs()
    mask = flat_labels != -100
    weight = mask / mask.sum()  # token-mean over the scored tokens
    seq_adv = adv[:, None].expand(labels.shape).flatten()
    logp_d, ent_d = (x.detach().view(labels.shape).requires_grad_() for x in (logp, entropy))
    loss, _ = reference.policy_loss(logp_d, old, adv, mask.view(labels.shape), ref_logp=ref, entropy=ent_d, **OPTIONS)
    g_logp, g_ent = (g.flatten() for g in torch.autograd.grad(loss, (logp_d, ent_d)))
    row, _ = scales(z.detach(), z_scale, flat_labels, torch.stack([g_logp, g_ent]), 1.0)
    loss_terms, g_error = magnitudes(logp.detach(), old.flatten(), ref.flatten(), seq_adv, entropy.detach().abs() + row,
                                     weight, OPTIONS, logp_scale=row)
    upstream = torch.stack([g_logp.abs() + g_error, g_ent.abs()])
    _, grad_scale = scales(z.detach(), z_scale, flat_labels, upstream, 1.0)
    grad_z = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), z)[0]
    at_label = torch.zeros_like(z).scatter_(-1, flat_labels.clamp_min(0)[:, None], 1.0)
    g_scale = grad_scale + g_error[:, None] * (z.detach().softmax(-1) + at_label) + (1 + stored_logits) * grad_z.abs()
    # Each token's own error (from its log-prob's), plus the sum's roundings as in policy_loss's check.
    loss_scale = loss_terms.sum() + (mask.sum() / 8 + 16) * magnitudes(
        logp.detach(), old.flatten(), ref.flatten(), seq_adv, entropy.detach().abs(), weight, OPTIONS)[0].sum()
    scales_out = (loss_scale, (g_scale @ w.abs()).view(h.shape), g_scale.T @ h.abs().flatten(0, 1))
    names = ("loss", "grad hidden", "grad weight")
    stored = (compute, dtype, dtype)
    return {n: within(g, x, bound(x, sc, compute, st)) for n, g, x, sc, st in zip(names, got, exact, scales_out, stored)}
