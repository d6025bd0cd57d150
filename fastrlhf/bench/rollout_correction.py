"""Benchmark cases of ``fastrlhf.rollout_correction`` (``fastrlhf/ops/rollout_correction.py``)."""

from __future__ import annotations

import importlib.util

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check

# Per token, each input read once and each output written once: old_logp and rollout_logp (fp32) and the
# mask (bool) read, the weight (fp32) and the kept flag (bool) written.
BYTES_PER_TOKEN = 2 * 4 + 1 + 4 + 1
# Sequence-level TIS and a rejection chain of a token-level and a sequence-level option (two passes).
OPTIONS = dict(is_level="sequence", is_threshold=2.0, rs="token_k1,seq_mean_k3", rs_threshold="0.8_1.25,0.00126")


def inputs(B: int, T: int, seed=0):
    """old_logp, rollout_logp (fp32, a train/inference drift of 0.05 nats per token) and a right-padded mask
    (half to all of T per row)."""
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g) * 3
    old = rollout + torch.randn(B, T, generator=g) * 0.05
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    return old, rollout, torch.arange(T)[None, :] < lengths[:, None]


def _verl(old, rollout, mask):
    """verl's ``compute_rollout_correction_and_rejection_mask`` (its metrics, off-policy KL and PPL included,
    read back with ``.item()``)."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    weights, kept, metrics = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask.float(), rollout_is=OPTIONS["is_level"], rollout_is_threshold=OPTIONS["is_threshold"],
        rollout_rs=OPTIONS["rs"], rollout_rs_threshold=OPTIONS["rs_threshold"])
    return weights.batch["rollout_is_weights"], kept, metrics


def _same(B: int, T: int):
    """The check before timing: the fused op's outputs against the float64 reference of the same inputs at fp32
    tolerances, and its kept mask equal to the baseline's. (The fp32 baseline itself is further off: it sums
    a sequence's thousands of fp32 log-ratios in fp32, the fused op in fp64.)"""
    def same(got, want):
        old, rollout, mask = inputs(B, T)
        exact = reference.rollout_correction(old.double(), rollout.double(), mask, **OPTIONS)
        torch.testing.assert_close(got[0], exact[0])
        assert torch.equal(got[1], exact[1]) and torch.equal(got[1], want[1]), "kept masks differ"
        for name in exact[2]:
            torch.testing.assert_close(got[2][name], exact[2][name], msg=name)
    return same


def cases(quick: bool) -> list[Case]:
    shapes = [(64, 1024)] if quick else [(64, 1024), (512, 4096)]
    references = {"plain torch (verl-style, sync-free)":
                  lambda old, rollout, mask: reference.rollout_correction(old, rollout, mask, **OPTIONS)}
    if importlib.util.find_spec("verl") is not None:
        references["verl compute_rollout_correction_and_rejection_mask"] = _verl
    return [Case("rollout_correction", f"B={B} T={T} fp32 sequence TIS + token_k1,seq_mean_k3",
                 lambda B=B, T=T: inputs(B, T),
                 lambda old, rollout, mask: fastrlhf.rollout_correction(old, rollout, mask, **OPTIONS),
                 references, BYTES_PER_TOKEN * B * T, _same(B, T), x=B * T) for B, T in shapes]


def checks() -> list[Check]:
    """None: the weights are exp of a clamped sum and the rejections are comparisons at thresholds, where a
    per-element rounding bound does not apply (a token at a threshold flips). Its tests
    (tests/ops/test_rollout_correction.py) check every backend against the float64 reference."""
    return []
