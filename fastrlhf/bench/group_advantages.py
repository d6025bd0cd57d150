"""Benchmark cases and verification checks of ``fastrlhf.group_advantages``."""

from __future__ import annotations

from collections import defaultdict

import torch

import fastrlhf
from fastrlhf.bench.case import Case, Check, bound, within

# Per token: the reward (fp32) and the mask read, the mask read again and the advantage written (fp32).
BYTES_PER_TOKEN = 4 + 1 + 1 + 4


def _inputs(B: int, T: int, G: int, with_out: bool, dtype=torch.float32, seed=0):
    """Token rewards (an outcome reward at the last token), right-padded masks, and hashed group ids: each
    prompt's G responses are contiguous rows with an arbitrary int64 id, as verl lays them out."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.zeros(B, T, dtype=dtype)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).to(dtype)
    index = torch.randint(0, 2**62, (B // G,), generator=g).repeat_interleave(G)
    inputs = (rewards, index, mask, G)
    return (*inputs, torch.empty(B, T)) if with_out else inputs


def verl_grpo_loop(token_level_rewards, response_mask, index, epsilon=1e-6):
    """verl's ``compute_grpo_outcome_advantage`` as verl writes it (``index``: a numpy array of ids)."""
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx], id2std[idx] = torch.mean(scores_tensor), torch.std(scores_tensor)
        for i in range(bsz):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        scores = scores.unsqueeze(-1) * response_mask
    return scores


def torch_contiguous_groups(rewards, mask, G, out=None, epsilon=1e-6):
    """Vectorised plain torch for contiguous groups of G (TRL's ``view(-1, G)``)."""
    grouped = rewards.sum(-1).view(-1, G)
    advantages = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + epsilon)
    return torch.mul(advantages.view(-1, 1), mask, out=out)


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def cases(quick: bool) -> list[Case]:
    B, G = (2048, 16) if quick else (8192, 16)
    T = 1024
    shape = f"B={B} G={G} T={T} fp32"
    fresh = lambda: _inputs(B, T, G, with_out=False)  # noqa: E731
    reused = lambda: _inputs(B, T, G, with_out=True)  # noqa: E731
    return [
        Case("group_advantages grpo", shape, fresh,
             lambda r, i, m, G: fastrlhf.group_advantages(r, i, mask=m),
             {"verl loop": lambda r, i, m, G: verl_grpo_loop(r, m, i.numpy()),
              "torch view(-1, G)": lambda r, i, m, G: torch_contiguous_groups(r, m, G)},
             BYTES_PER_TOKEN * B * T, _same, x=B),
        Case("group_advantages grpo out=", shape, reused,
             lambda r, i, m, G, out: fastrlhf.group_advantages(r, i, mask=m, out=out),
             {"torch view(-1, G)": lambda r, i, m, G, out: torch_contiguous_groups(r, m, G),
              "torch view(-1, G) out=": lambda r, i, m, G, out: torch_contiguous_groups(r, m, G, out=out)},
             BYTES_PER_TOKEN * B * T, _same, x=B),
    ]


ESTIMATORS = (("grpo", {}), ("grpo", {"scale": "batch"}), ("rloo", {}), ("opo", {}))


def checks() -> list[Check]:
    grid = [(2, 1, 2), (64, 50, 8), (96, 300, 16)]
    return [Check("group_advantages", " ".join([f"B={B} T={T} G={G} {estimator}", *(f"{k}={v}" for k, v in options.items())]), dtype,
                  lambda device, B=B, T=T, G=G, estimator=estimator, options=options, dtype=dtype:
                  _check(B, T, G, estimator, options, dtype, device))
            for B, T, G in grid for estimator, options in ESTIMATORS
            for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(B: int, T: int, G: int, estimator: str, options: dict, dtype: torch.dtype,
           device: torch.device) -> dict[str, tuple[float, float]]:
    """The advantages against float64 on the rounded rewards (random, not 0/1, so that rounding matters)."""
    _, index, mask, _ = _inputs(B, T, G, with_out=False, seed=B * T)
    rewards = torch.randn(B, T, generator=torch.Generator().manual_seed(B + T), dtype=torch.float64).to(dtype).double()
    got = fastrlhf.group_advantages(rewards.to(device=device, dtype=dtype), index.to(device),
                                    estimator=estimator, mask=mask.to(device), **options).cpu()
    exact = fastrlhf.reference.group_advantages(rewards, index, estimator=estimator, mask=mask, **options)
    # Every backend computes in float64 (row sums, then two-pass shifted statistics), so the bound is
    # essentially the final rounding. The magnitudes: each row's |rewards| summed and its group's largest,
    # at most T + B additions deep, over the spread the centred score is divided by (grpo's std + eps).
    row = torch.where(mask, rewards.abs(), 0.0).sum(1)
    group_max = row.view(-1, G).amax(1).repeat_interleave(G)
    score = torch.where(mask, rewards, 0.0).sum(1)
    if estimator != "grpo":
        spread = torch.ones(B, dtype=torch.float64)
    elif options.get("scale") == "batch":
        spread = (score.std() + 1e-6).expand(B)
    else:
        spread = score.view(-1, G).std(1).repeat_interleave(G) + 1e-6
    scale = 2 * (T + B) * (row + group_max)[:, None] * (1 + exact.abs()) / spread[:, None]
    return {"advantages": within(got, exact, bound(exact, scale, torch.float64, got.dtype))}
