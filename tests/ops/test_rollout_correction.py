"""fastrlhf.rollout_correction on every backend (the plain-torch reference, C++, Triton interpreted) against
per-sequence loops written from the formulas and against the float64 reference."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import backend, reference
from fastrlhf.ops import rollout_correction as op
from fastrlhf.reference.rollout_correction import METRICS, RS_OPTIONS

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
    metrics = {"is_weight_mean": raw[mask].sum() / n, "is_weight_min": raw[mask].min(),
               "is_weight_max": raw[mask].max(),
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
def test_matches_loops(any_backend, is_level, is_threshold, rs, rs_threshold, options):
    old, rollout, mask = inputs(seed=len(options) + 3 * (is_level is None))
    weights, new_mask, metrics = fastrlhf.rollout_correction(old, rollout, mask, is_level=is_level,
                                                             is_threshold=is_threshold, rs=rs,
                                                             rs_threshold=rs_threshold)
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


@pytest.mark.parametrize("is_level,is_threshold,rs,rs_threshold,options", CASES[3:4] + CASES[5:6] + CASES[-1:])
def test_masked_values_never_read(any_backend, is_level, is_threshold, rs, rs_threshold, options):
    old, rollout, mask = inputs(seed=12)
    kwargs = dict(is_level=is_level, is_threshold=is_threshold, rs=rs, rs_threshold=rs_threshold)
    want = fastrlhf.rollout_correction(torch.where(mask, old, 0), torch.where(mask, rollout, 0), mask, **kwargs)
    for fill_old, fill_rollout in ((float("inf"), float("-inf")), (float("-inf"), float("nan"))):
        got = fastrlhf.rollout_correction(torch.where(mask, old, fill_old), torch.where(mask, rollout, fill_rollout),
                                          mask, **kwargs)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert torch.equal(got[1], want[1])
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=0, msg=name)


def test_empty_mask(any_backend):
    old, rollout, mask = inputs(seed=13)
    weights, new_mask, metrics = fastrlhf.rollout_correction(old, rollout, torch.zeros_like(mask),
                                                             is_level="sequence", rs="seq_max_k3", rs_threshold=0.1)
    assert torch.equal(weights, torch.zeros_like(weights)) and not new_mask.any()
    for name, value in metrics.items():
        assert value.item() == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_fp32_math(any_backend, dtype):
    """Rounded inputs give the float64 answer of the rounded values, to fp32 accuracy; an int 0/1 mask works."""
    if any_backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not compute bf16 (the AOT compile covers its variants)")
    old, rollout, mask = inputs(seed=14, drift=0.1)
    old, rollout = torch.where(mask, old, 0).to(dtype), rollout.to(dtype)
    kwargs = dict(is_level="token", is_threshold=1.1, rs="token_k1,seq_mean_k3", rs_threshold="0.8_1.2,0.01")
    weights, new_mask, metrics = fastrlhf.rollout_correction(old, rollout, mask.to(torch.int32), **kwargs)
    want_w, want_mask, want_metrics = reference.rollout_correction(old.double(), rollout.double(), mask, **kwargs)
    torch.testing.assert_close(weights, want_w)
    assert torch.equal(new_mask, want_mask)
    for name in metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], msg=name)


@pytest.mark.parametrize("is_level,is_threshold,rs,rs_threshold,options", CASES[3:5] + CASES[8:])
def test_packed_equals_padded(any_backend, is_level, is_threshold, rs, rs_threshold, options):
    """Packed sequences of different lengths (one empty) give the padded answer of the same tokens."""
    old, rollout, mask = inputs(seed=15)
    lengths = [15, 4, 0, 15, 9, 1]
    inside = torch.arange(15)[None, :] < torch.tensor(lengths)[:, None]
    mask = mask & inside
    kwargs = dict(is_level=is_level, is_threshold=is_threshold, rs=rs, rs_threshold=rs_threshold)
    want_w, want_mask, want_metrics = fastrlhf.rollout_correction(old, rollout, mask, **kwargs)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    weights, new_mask, metrics = fastrlhf.rollout_correction(old[inside], rollout[inside], mask[inside],
                                                             cu_seqlens=cu_seqlens, **kwargs)
    torch.testing.assert_close(weights, want_w[inside])
    assert torch.equal(new_mask, want_mask[inside])
    for name in metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], msg=name)


def test_bad_cu_seqlens():
    old, rollout, mask = inputs(seed=16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastrlhf.rollout_correction(old.view(-1), rollout.view(-1), mask.view(-1), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="old_logp"):
        fastrlhf.rollout_correction(old, rollout, mask, cu_seqlens=torch.tensor([0, 90]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_sequences_match_reference(kernel_backend, dtype):
    """Sequences longer than a Triton tile and a C++ grain, every option family at once, against the float64
    reference of the same inputs."""
    old, rollout, mask = inputs(B=5, T=2300, seed=17, drift=0.05)
    old, rollout = old.to(dtype), rollout.to(dtype)
    for kwargs in (dict(is_level="sequence", is_threshold=(0.2, 3.0), rs="seq_mean_k1,seq_max_k2,token_k3",
                        rs_threshold="0.999_1.001,0.022,0.003"),
                   dict(is_level="token", is_threshold=1.05, rs="seq_sum_k2", rs_threshold=2.3)):
        got = fastrlhf.rollout_correction(old, rollout, mask, **kwargs)
        want = reference.rollout_correction(old.double(), rollout.double(), mask, **kwargs)
        torch.testing.assert_close(got[0], want[0])
        assert torch.equal(got[1], want[1])
        assert 0 < float(want[2]["rs_token_fraction"]) < 1 and float(want[2]["is_clipped_fraction"]) > 0
        for name in METRICS:
            torch.testing.assert_close(got[2][name], want[2][name], msg=name)


def test_nan_at_unmasked_tokens_like_reference(kernel_backend):
    """A NaN log-prob at an unmasked token: its weight is NaN (unless rejected) and the weight metrics are NaN,
    as in the reference; every rejection option that reads it rejects it."""
    old, rollout, mask = inputs(seed=18)
    old = torch.where(mask, old, 0.0)
    old[0, 3], mask[0, 3] = float("nan"), True
    for kwargs in (dict(is_level="token", is_threshold=1.5), dict(is_level="sequence", rs="token_k2", rs_threshold=1),
                   dict(is_level="token", rs="seq_max_k3", rs_threshold=0.5),
                   dict(is_level="token", rs="seq_mean_k1", rs_threshold=3.0)):
        got = fastrlhf.rollout_correction(old, rollout, mask, **kwargs)
        want = reference.rollout_correction(old, rollout, mask, **kwargs)
        torch.testing.assert_close(got[0], want[0], equal_nan=True)
        assert torch.equal(got[1], want[1])
        for name in METRICS:
            torch.testing.assert_close(got[2][name], want[2][name], equal_nan=True, msg=name)


def test_independent_of_threads():
    """Fixed-order sums: the same bits with one thread and with several."""
    old, rollout, mask = inputs(B=64, T=700, seed=19, drift=0.1)
    kwargs = dict(is_level="sequence", is_threshold=5.0, rs="seq_mean_k3", rs_threshold=0.01)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastrlhf.rollout_correction(old.float(), rollout.float(), mask, **kwargs)
        torch.set_num_threads(max(2, threads))
        many = fastrlhf.rollout_correction(old.float(), rollout.float(), mask, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert all(torch.equal(one[2][k], many[2][k]) for k in METRICS)


def test_metrics_are_views_of_one_tensor():
    old, rollout, mask = inputs(seed=20)
    _, _, metrics = fastrlhf.rollout_correction(old, rollout, mask, is_level="token")
    assert len({m._base.data_ptr() for m in metrics.values()}) == 1


def test_opcheck(kernel_backend):
    old, rollout, mask = inputs(seed=21)
    flat = [torch.where(mask, x, 0.0).reshape(-1) for x in (old, rollout)]
    options = op.make_options("sequence", (0.5, 2.0), "token_k1,seq_mean_k3", "0.7_1.3,0.05")
    torch.library.opcheck(torch.ops.fastrlhf.rollout_correction_forward,
                          (*flat, mask.reshape(-1), torch.arange(0, 91, 15), *options))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    old, rollout, mask = (x.float() if x.is_floating_point() else x for x in inputs(seed=22))
    kwargs = dict(is_level="token", is_threshold=(0.5, 1.5), rs="seq_sum_k2", rs_threshold=0.5)

    @torch.compile(fullgraph=True, backend=compiler)
    def step(old, rollout, mask):
        weights, kept, metrics = fastrlhf.rollout_correction(old, rollout, mask, **kwargs)
        return weights, kept, metrics["rs_token_fraction"]

    got = step(old, rollout, mask)
    want = fastrlhf.rollout_correction(old, rollout, mask, **kwargs)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2]["rs_token_fraction"])


def test_cpp_op_checks_its_inputs():
    old, rollout, mask = (x.reshape(-1) for x in inputs(seed=23))
    options = op.make_options("token", 2.0, "token_k2", 0.1)
    weights, kept, metrics = torch.empty(90), torch.empty(90, dtype=torch.bool), torch.empty(len(METRICS))
    cpp = backend.cpp_ops()
    offsets = torch.arange(0, 91, 15)
    for args, match in (
            ((old, rollout[:80], mask, offsets, *options, weights, kept, metrics), "rollout_logp"),
            ((old, rollout.float(), mask, offsets, *options, weights, kept, metrics), "rollout_logp"),
            ((old, rollout, mask.int(), offsets, *options, weights, kept, metrics), "mask"),
            ((old, rollout, mask, torch.tensor([0, 50, 40, 90]), *options, weights, kept, metrics), "offsets"),
            ((old, rollout, mask, torch.tensor([0, 50, 95]), *options, weights, kept, metrics), "offsets"),
            ((old, rollout, mask, offsets, 3, *options[1:], weights, kept, metrics), "is_level"),
            ((old, rollout, mask, offsets, *options[:4], 1 << 12, options[5], weights, kept, metrics), "rs_flags"),
            ((old, rollout, mask, offsets, *options[:5], [0.0] * 3, weights, kept, metrics), "rs_bounds"),
            ((old, rollout, mask, offsets, *options, weights.double(), kept, metrics), "weights"),
            ((old, rollout, mask, offsets, *options, weights, kept[:5], metrics), "kept"),
            ((old, rollout, mask, offsets, *options, weights, kept, metrics[:2]), "metrics")):
        with pytest.raises(RuntimeError, match=match):
            cpp.rollout_correction(*args)


def test_unchecked_bad_offsets_poison_the_metrics(unchecked_values):
    """Without value checks (CUDA), out-of-order or out-of-range cu_seqlens read nothing and make the
    metrics NaN: never an out-of-bounds read, never a finite answer."""
    pytest.importorskip("triton")
    old, rollout, mask = (x.reshape(-1) for x in inputs(seed=24))
    with backend.use_backend("triton"):
        for cu in ([0, 50, 40, 90], [0, 50, 95], [3, 50, 90], [0, 30, 1 << 40]):
            _, _, metrics = fastrlhf.rollout_correction(old, rollout, mask, is_level="token",
                                                        cu_seqlens=torch.tensor(cu))
            assert all(torch.isnan(m) for m in metrics.values()), cu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    old, rollout, mask = (x.cuda() for x in inputs(B=8, T=3000, seed=25, drift=0.05))
    old, rollout = old.float(), rollout.float()
    kwargs = dict(is_level="sequence", is_threshold=(0.5, 2.0), rs="token_k1,seq_mean_k3,seq_max_k2",
                  rs_threshold="0.5_2.0,0.01,0.05")
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fastrlhf.rollout_correction(old, rollout, mask, **kwargs)
        packed = fastrlhf.rollout_correction(old.view(-1), rollout.view(-1), mask.view(-1),
                                             cu_seqlens=torch.arange(0, 24001, 3000, device="cuda"), **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = reference.rollout_correction(old.cpu().double(), rollout.cpu().double(), mask.cpu(), **kwargs)
    torch.testing.assert_close(got[0].cpu(), want[0])
    torch.testing.assert_close(packed[0].cpu(), want[0].view(-1))
    assert torch.equal(got[1].cpu(), want[1])
    for name in METRICS:
        torch.testing.assert_close(got[2][name].cpu(), want[2][name], msg=name)
