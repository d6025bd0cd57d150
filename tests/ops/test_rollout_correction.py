"""fastrlhf.rollout_correction (plain torch, sync-free) against per-sequence loops written from the formulas."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf.reference.rollout_correction import RS_OPTIONS

F64 = torch.float64


def inputs(B=6, T=15, seed=0, drift=0.4):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = rollout + torch.randn(B, T, generator=g, dtype=F64) * drift
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[2] = False
    old[~mask] = float("nan")
    return old, rollout, mask


def expected(old, rollout, mask, is_level, is_threshold, options):
    """Loops over sequences and tokens; options: [(kind, level, lower_log or None, upper)]."""
    B, T = old.shape
    weights = torch.zeros(B, T, dtype=F64)
    raw = torch.zeros(B, T, dtype=F64)
    keep = mask.clone()
    clipped = 0
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        lr = {t: float(old[b, t] - rollout[b, t]) for t in idx}
        seq_w = math.exp(max(-20, min(20, sum(lr.values()))))
        for t in idx:
            w = 1.0 if is_level is None else (math.exp(max(-20, min(20, lr[t]))) if is_level == "token" else seq_w)
            raw[b, t] = w
            if is_level is not None and isinstance(is_threshold, tuple):
                out = not is_threshold[0] <= w <= is_threshold[1]
                w = 0.0 if out else w
            elif is_level is not None:
                out = w > is_threshold
                w = min(w, is_threshold)
            else:
                out = False
            clipped += out
            weights[b, t] = w
        for kind, level, lower, upper in options:
            safe = {t: max(-20, min(20, lr[t])) for t in idx}
            value = {t: {"k1": -s, "k2": 0.5 * s * s, "k3": math.exp(s) - 1 - s}[kind] for t, s in safe.items()}

            def ok(v):
                return v <= upper if lower is None else lower <= v <= upper
            if level == "token":
                for t in idx:
                    keep[b, t] &= ok(value[t])
            elif idx:
                agg = {"sum": sum, "mean": lambda v: sum(v) / len(v), "max": max}[level](list(value.values()))
                if not ok(agg):
                    keep[b] = False
    n = int(mask.sum())
    rejected = mask & ~keep
    metrics = {"is_weight_mean": raw[mask].sum() / n, "is_weight_min": raw[mask].min(), "is_weight_max": raw[mask].max(),
               "is_clipped_fraction": clipped / n, "rs_token_fraction": rejected.sum() / n,
               "rs_sequence_fraction": rejected.any(-1).double().mean()}
    return torch.where(keep, weights, 0).float(), keep & mask, metrics


CASES = [
    (None, 2.0, None, None, []),
    ("token", 2.0, None, None, []),
    ("token", (0.5, 1.5), None, None, []),
    ("sequence", 3.0, None, None, []),
    ("sequence", (0.2, 5.0), None, None, []),
    ("token", 1.2, "token_k1", 1.5, [("k1", "token", math.log(1 / 1.5), math.log(1.5))]),
    ("token", 2.0, "token_k1", "0.6_1.4", [("k1", "token", math.log(0.6), math.log(1.4))]),
    (None, 2.0, "token_k2,token_k3", "0.05,0.04", [("k2", "token", None, 0.05), ("k3", "token", None, 0.04)]),
    ("sequence", 2.0, "seq_sum_k1", "0.5_2.0", [("k1", "sum", math.log(0.5), math.log(2.0))]),
    (None, 2.0, "seq_sum_k2,seq_sum_k3", 0.6, [("k2", "sum", None, 0.6), ("k3", "sum", None, 0.6)]),
    ("token", 2.0, "seq_mean_k1,seq_mean_k2", "0.8_1.25,0.1", [("k1", "mean", math.log(0.8), math.log(1.25)),
                                                              ("k2", "mean", None, 0.1)]),
    (None, 2.0, "seq_mean_k3", 0.07, [("k3", "mean", None, 0.07)]),
    ("token", 2.0, "seq_max_k2, seq_max_k3", "0.3,0.3", [("k2", "max", None, 0.3), ("k3", "max", None, 0.3)]),
]


@pytest.mark.parametrize("is_level,is_threshold,rs,rs_threshold,options", CASES)
def test_matches_loops(is_level, is_threshold, rs, rs_threshold, options):
    old, rollout, mask = inputs(seed=len(options) + 3 * (is_level is None))
    weights, new_mask, metrics = fastrlhf.rollout_correction(old, rollout, mask, is_level=is_level,
                                                             is_threshold=is_threshold, rs=rs, rs_threshold=rs_threshold)
    want_w, want_mask, want_metrics = expected(old, rollout, mask, is_level, is_threshold, options)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    torch.testing.assert_close(weights, want_w)
    assert torch.equal(new_mask, want_mask)
    for name, value in want_metrics.items():
        assert metrics[name].dtype == torch.float32 and metrics[name].shape == ()
        torch.testing.assert_close(metrics[name], torch.as_tensor(value, dtype=torch.float32), msg=name)
    if rs is not None:
        assert 0 < metrics["rs_token_fraction"] < 1, "the case should reject some tokens, not all"


def test_every_option_is_covered():
    used = {o.strip() for case in CASES if case[2] for o in case[2].split(",")}
    assert used == set(RS_OPTIONS)


@pytest.mark.parametrize("kwargs,match", [
    ({"is_level": "tok"}, "is_level"),
    ({"is_level": "token", "is_threshold": 0.0}, "is_threshold"),
    ({"is_level": "token", "is_threshold": (2.0, 1.0)}, "is_threshold"),
    ({"rs": "token_k4", "rs_threshold": 1.0}, "rs"),
    ({"rs": "token_k2"}, "rs_threshold"),
    ({"rs": "token_k2", "rs_threshold": "0.1_0.2"}, "rs_threshold"),
    ({"rs": "token_k1,token_k2", "rs_threshold": "1,2,3"}, "rs_threshold"),
    ({"rs": "token_k2", "rs_threshold": -1.0}, "rs_threshold"),
])
def test_bad_arguments(kwargs, match):
    old, rollout, mask = inputs(seed=9)
    with pytest.raises(ValueError, match=match):
        fastrlhf.rollout_correction(old, rollout, mask, **kwargs)


def test_bad_tensors():
    old, rollout, mask = inputs(seed=10)
    with pytest.raises(TypeError, match="rollout_logp"):
        fastrlhf.rollout_correction(old, rollout.float(), mask)
    with pytest.raises(ValueError, match="mask"):
        fastrlhf.rollout_correction(old, rollout, mask[:, :3])


def test_feeds_policy_loss():
    old, rollout, mask = inputs(seed=11)
    weights, new_mask, _ = fastrlhf.rollout_correction(old, rollout, mask, is_level="token", rs="token_k2",
                                                       rs_threshold=0.05)
    logp = torch.where(new_mask, old, 0.0) + 0.01
    loss, _ = fastrlhf.policy_loss(logp, old, torch.ones_like(old), new_mask,
                                   rollout_is_weights=weights.double())
    assert torch.isfinite(loss)
