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
from fastrlhf.bench.case import Case, Check

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
    """None yet: ``fastrlhf verify`` bounds each output by the magnitudes it is computed from
    (``fastrlhf.bench.case.bound``), and those scales are not derived for this op yet. Its tests
    (tests/ops/test_linear_policy_loss.py) check every backend against the float64 reference."""
    return []
