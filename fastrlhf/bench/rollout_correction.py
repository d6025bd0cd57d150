"""Benchmark cases of ``fastrlhf.rollout_correction`` (``fastrlhf/ops/rollout_correction.py``)."""

from __future__ import annotations

import importlib.util

import torch

import fastrlhf
from fastrlhf import reference
from fastrlhf.bench.case import Case, Check, bound, compute_dtype, within

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


# verl's names of the metrics that it defines as fastrlhf does (its rollout_is_mean is taken after truncation).
VERL_METRICS = {"is_weight_min": "rollout_is_min", "is_weight_max": "rollout_is_max",
                "rs_token_fraction": "rollout_rs_masked_fraction",
                "rs_sequence_fraction": "rollout_rs_seq_masked_fraction"}


def _verl(old, rollout, mask):
    """verl's ``compute_rollout_correction_and_rejection_mask`` (its metrics, off-policy KL and PPL included,
    read back with ``.item()``), its outputs in fastrlhf's form: weights 0 outside the kept mask (verl
    leaves them; its loss multiplies by the mask), the kept mask as bool, the metrics both define."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    weights, kept, metrics = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask.float(), rollout_is=OPTIONS["is_level"], rollout_is_threshold=OPTIONS["is_threshold"],
        rollout_rs=OPTIONS["rs"], rollout_rs_threshold=OPTIONS["rs_threshold"])
    kept = kept.bool()
    return (torch.where(kept, weights.batch["rollout_is_weights"], 0), kept,
            {name: torch.tensor(metrics[f"rollout_corr/{key}"]) for name, key in VERL_METRICS.items()})


def _same(B: int, T: int):
    """The check before timing, of the fused op and of each reference: the kept mask equal to the float64
    reference's and the baseline's, the shares of tokens and sequences at fp32 tolerances, and the weights
    and weight metrics within ``bound``: K fp32 roundings of their magnitude times ``1 + sum |log w|`` over
    the sequence (a sequence weight is exp of that sum; the fp32 plain-torch baseline sums it in fp32, the
    fused op in fp64 and lands far inside the bound)."""
    def same(got, want):
        old, rollout, mask = inputs(B, T)
        exact = reference.rollout_correction(old.double(), rollout.double(), mask, **OPTIONS)
        assert torch.equal(got[1], exact[1]) and torch.equal(got[1], want[1]), "kept masks differ"
        spread = 1 + torch.where(mask, old.double() - rollout.double(), 0).abs().sum(-1, keepdim=True)
        error, allowed = within(got[0], exact[0], bound(exact[0], exact[0].abs() * spread, torch.float32,
                                                        torch.float32))
        assert error <= allowed, f"weights: error {error} above the bound {allowed}"
        for name in got[2]:
            value = exact[2][name].double()
            if name.startswith("is_weight"):
                error, allowed = within(got[2][name], value, bound(value, value.abs() * spread.max(),
                                                                   torch.float32, torch.float32))
                assert error <= allowed, f"{name}: error {error} above the bound {allowed}"
            else:
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
    """Truncated importance weights (TIS) at token and sequence level, which are continuous in the inputs:
    ``min(w, threshold)`` of ``w = exp`` of a clamped log-ratio (sum). Rejection is left out of these
    checks (a token at a threshold flips either way under any rounding); its tests check it on every
    backend against the float64 reference."""
    grid = [(1, 1), (4, 100), (3, 1100)]
    return [Check("rollout_correction", f"B={B} T={T} is_level={level} is_threshold=2.0", dtype,
                  lambda device, B=B, T=T, level=level, dtype=dtype: _check(B, T, level, dtype, device))
            for B, T in grid for level in ("token", "sequence")
            for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _check(B: int, T: int, level: str, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Weights and weight metrics against float64 on the rounded inputs. Scale: |w| times 1 plus the |log w|
    terms it is exp of (the token's, or the sequence's sum): each term's rounding becomes a relative error."""
    old, rollout, mask = inputs(B, T, seed=B * T)
    old, rollout = (x.to(dtype).double() for x in (old, rollout))
    options = dict(is_level=level, is_threshold=2.0)
    got = fastrlhf.rollout_correction(old.to(device=device, dtype=dtype), rollout.to(device=device, dtype=dtype),
                                      mask.to(device), **options)
    exact = reference.rollout_correction(old, rollout, mask, **options)
    log_w = torch.where(mask, old - rollout, 0).abs()
    spread = 1 + (log_w.sum(-1, keepdim=True) if level == "sequence" else log_w)
    compute = compute_dtype(dtype)
    out = {"weights": within(got[0].cpu(), exact[0], bound(exact[0], exact[0].abs() * spread, compute,
                                                            torch.float32))}
    for name in ("is_weight_mean", "is_weight_min", "is_weight_max"):
        value = exact[2][name].double()
        out[name] = within(got[2][name].cpu(), value, bound(value, value.abs() * spread.max(), compute, torch.float32))
    return out
