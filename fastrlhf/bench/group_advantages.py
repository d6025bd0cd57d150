"""Benchmark cases and verification checks of ``fastrlhf.group_advantages``."""

from __future__ import annotations

from collections import defaultdict

import torch

import fastrlhf
from fastrlhf.bench.case import Case, Check

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


def checks() -> list[Check]:
    """None yet: ``fastrlhf verify`` bounds each output by the magnitudes it is computed from
    (``fastrlhf.bench.case.bound``), and those scales are not derived for this op yet. Its tests
    (tests/ops/test_group_advantages.py) check every backend against the float64 reference."""
    return []
