"""fastrlhf.gae and fastrlhf.masked_whiten against the plain-torch reference, on every backend."""

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf import backend, reference

F64 = torch.float64


def inputs(B, T, dtype=F64, seed=0, holes=0.3, done_rate=0.1):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=F64).to(dtype)
    mask = torch.rand(B, T, generator=g) > holes
    dones = torch.rand(B, T, generator=g) < done_rate
    boot = torch.randn(B, generator=g, dtype=F64).to(dtype)
    return r, v, mask, dones, boot


def padded_mask(B, T, seed, side):
    """Each row holds a random number (>= 1) of valid tokens, padded on ``side``."""
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    cols = torch.arange(T)[None, :]
    return cols < lengths[:, None] if side == "right" else cols >= T - lengths[:, None]


def assert_matches_reference(r, v, mask=None, **kw):
    got = fastrlhf.gae(r, v, mask, **kw)
    want = reference.gae(r, v, mask, **kw)
    for name, x, y in zip(("advantages", "returns"), got, want):
        assert x.dtype == r.dtype, name
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")
    return got


OPTIONS = {
    "plain": {},
    "gamma-lam": {"gamma": 0.99, "lam": 0.95},
    "dones+bootstrap": {"dones": True, "bootstrap": True, "gamma": 0.9, "lam": 0.8},
    "returns_lam": {"gamma": 0.97, "lam": 0.9, "returns_lam": 1.0},
    "per-sequence": {"gamma": "tensor", "lam": "tensor", "bootstrap": True},
    "zero-mode": {"mask_mode": "zero", "dones": True, "bootstrap": True, "gamma": 0.9, "lam": 0.7},
}


def build(option, r, v, mask, dones, boot):
    kw = {k: x for k, x in option.items() if k not in ("dones", "bootstrap")}
    if option.get("dones"):
        kw["dones"] = dones
    if option.get("bootstrap"):
        kw["bootstrap_value"] = boot
    for name in ("gamma", "lam"):
        if kw.get(name) == "tensor":
            kw[name] = torch.rand(r.shape[0], generator=torch.Generator().manual_seed(7), dtype=F64)
    return kw


@pytest.mark.parametrize("option", OPTIONS, ids=str)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 5), (5, 37), (2, 1100)])
def test_matches_reference_float64(any_backend, option, B, T):
    r, v, mask, dones, boot = inputs(B, T, seed=B * 1000 + T)
    assert_matches_reference(r, v, mask, **build(OPTIONS[option], r, v, mask, dones, boot))


@pytest.mark.parametrize("B,T", [(64, 4096), (300, 17)])
def test_matches_reference_large_cpp(B, T):
    r, v, mask, dones, boot = inputs(B, T, seed=T)
    with backend.use_backend("cpp"):
        assert_matches_reference(r, v, mask, dones=dones, bootstrap_value=boot, gamma=0.99, lam=0.95)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_reference(kernel_backend, side):
    r, v, _, _, _ = inputs(6, 50, seed=3)
    assert_matches_reference(r, v, padded_mask(6, 50, 3, side))


@pytest.mark.parametrize("mask_mode", ["skip", "zero"])
@pytest.mark.parametrize("garbage", [1e6, math.inf, -math.inf, math.nan])
def test_garbage_at_masked_tokens_changes_nothing(kernel_backend, mask_mode, garbage):
    r, v, mask, dones, boot = inputs(4, 60, seed=11)
    clean = fastrlhf.gae(r, v, mask, dones=dones, bootstrap_value=boot, gamma=0.9, lam=0.9, mask_mode=mask_mode)
    dirty_r, dirty_v = r.masked_fill(~mask, garbage), v.masked_fill(~mask, garbage)
    dirty = fastrlhf.gae(dirty_r, dirty_v, mask, dones=dones, bootstrap_value=boot, gamma=0.9, lam=0.9,
                         mask_mode=mask_mode)
    torch.testing.assert_close(dirty[0][mask], clean[0][mask], rtol=0, atol=0)
    torch.testing.assert_close(dirty[1][mask], clean[1][mask], rtol=0, atol=0)
    assert dirty[0].isfinite().all(), "advantages at masked tokens carry finite values"


def test_zero_mode_is_openrlhf(kernel_backend):
    """OpenRLHF multiplies rewards and values by the action mask, then runs the plain loop."""
    r, v, mask, _, _ = inputs(3, 30, seed=5)
    m = mask.to(F64)
    got = fastrlhf.gae(r, v, mask, gamma=0.99, lam=0.95, mask_mode="zero")
    want = reference.gae(r * m, v * m, gamma=0.99, lam=0.95)
    torch.testing.assert_close(got, want)


def test_skip_mode_is_verl(kernel_backend):
    """verl's loop: masked steps update neither carry; returns = advantages + values everywhere."""
    r, v, mask, _, _ = inputs(3, 30, seed=6)
    m = mask.to(F64)
    next_value, last, out = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), []
    for t in reversed(range(30)):
        delta = r[:, t] + 0.99 * next_value - v[:, t]
        gae = delta + 0.99 * 0.95 * last
        next_value = v[:, t] * m[:, t] + (1 - m[:, t]) * next_value
        last = gae * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    want = torch.stack(out[::-1], dim=1)
    adv, ret = fastrlhf.gae(r, v, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + v)


def test_dones_split_rows_into_independent_episodes(kernel_backend):
    r, v, _, _, _ = inputs(1, 40, seed=8)
    dones = torch.zeros(1, 40, dtype=torch.bool)
    dones[0, 14] = True
    whole = fastrlhf.gae(r, v, dones=dones, gamma=0.9, lam=0.8)
    first = fastrlhf.gae(r[:, :15], v[:, :15], gamma=0.9, lam=0.8)
    second = fastrlhf.gae(r[:, 15:], v[:, 15:], gamma=0.9, lam=0.8)
    for k in range(2):
        torch.testing.assert_close(whole[k], torch.cat([first[k], second[k]], dim=1))


def test_packed_equals_padded(kernel_backend):
    lengths = [5, 0, 31, 1, 17]
    g = torch.Generator().manual_seed(9)
    r, v = torch.randn(5, 31, generator=g, dtype=F64), torch.randn(5, 31, generator=g, dtype=F64)
    mask = torch.arange(31)[None] < torch.tensor(lengths)[:, None]
    holes = torch.rand(5, 31, generator=g) > 0.2
    gamma = torch.rand(5, generator=g, dtype=F64)
    boot = torch.randn(5, generator=g, dtype=F64)
    padded = fastrlhf.gae(r, v, mask & holes, gamma=gamma, lam=0.9, bootstrap_value=boot)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = fastrlhf.gae(r[mask], v[mask], holes[mask], cu_seqlens=cu, gamma=gamma, lam=0.9, bootstrap_value=boot)
    for k in range(2):
        torch.testing.assert_close(packed[k], padded[k][mask])


def test_padding_invariance(kernel_backend):
    """Extra right padding changes nothing at the real tokens."""
    r, v, mask, _, _ = inputs(3, 20, seed=10)
    pad = torch.randn(3, 13, dtype=F64)
    longer = fastrlhf.gae(torch.cat([r, pad], 1), torch.cat([v, pad], 1),
                          torch.cat([mask, torch.zeros(3, 13, dtype=torch.bool)], 1), gamma=0.9, lam=0.9)
    short = fastrlhf.gae(r, v, mask, gamma=0.9, lam=0.9)
    for k in range(2):
        torch.testing.assert_close(longer[k][:, :20][mask], short[k][mask])


def test_float_mask_equals_bool_mask(kernel_backend):
    r, v, mask, _, _ = inputs(2, 25, seed=12)
    torch.testing.assert_close(fastrlhf.gae(r, v, mask.float()), fastrlhf.gae(r, v, mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_float32_reference(dtype):
    """fp32 arithmetic inside, one rounding to the input dtype at the end."""
    r, v, mask, dones, boot = inputs(8, 300, dtype=dtype, seed=13)
    with backend.use_backend("cpp"):
        got = fastrlhf.gae(r, v, mask, dones=dones, bootstrap_value=boot, gamma=0.99, lam=0.95)
    want = reference.gae(r.float(), v.float(), mask, dones=dones, bootstrap_value=boot.float(), gamma=0.99,
                         lam=0.95)
    for x, y in zip(got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x, y.to(dtype))


def test_fp16_on_triton():
    r, v, mask, _, _ = inputs(4, 70, dtype=torch.float16, seed=14)
    with backend.use_backend("triton"):
        got = fastrlhf.gae(r, v, mask, gamma=0.99, lam=0.95)
    want = reference.gae(r.float(), v.float(), mask, gamma=0.99, lam=0.95)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y.to(torch.float16))


def test_nan_stays_in_its_sequence(kernel_backend):
    r, v, mask, _, _ = inputs(3, 40, seed=15)
    mask[1, 20] = True
    r[1, 20] = math.nan
    adv, ret = fastrlhf.gae(r, v, mask)
    clean = fastrlhf.gae(r.nan_to_num(0.0), v, mask)
    assert adv[1, :21][mask[1, :21]].isnan().all()
    for row in (0, 2):
        torch.testing.assert_close(adv[row], clean[0][row])
        torch.testing.assert_close(ret[row], clean[1][row])


@pytest.mark.parametrize("where", ["reward", "value"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_does_not_cross_a_done(kernel_backend, where, bad):
    assert_nan_does_not_cross_a_done(29, where, bad)


def assert_nan_does_not_cross_a_done(done_at, where, bad):
    """A NaN or inf in a later episode leaves the earlier episode of its row finite and equal to the C++
    result; a NaN upstream gradient in an earlier episode leaves the later episode's gradients alone."""
    r, v, mask, _, boot = inputs(2, 70, seed=24)
    dones = torch.zeros(2, 70, dtype=torch.bool)
    dones[:, done_at] = True  # episodes [0, done_at] and (done_at, 70) in each row
    mask[:, done_at + 1:done_at + 11] = True
    (r if where == "reward" else v)[0, done_at + 6] = bad
    kw = dict(dones=dones, bootstrap_value=boot, gamma=0.9, lam=0.8, returns_lam=0.7)
    leaves = [x.clone().requires_grad_() for x in (r, v, boot)]
    adv, ret = fastrlhf.gae(leaves[0], leaves[1], mask, **{**kw, "bootstrap_value": leaves[2]})
    with backend.use_backend("cpp"):
        want = fastrlhf.gae(r, v, mask, **kw)
    for got, exact in zip((adv, ret), want):
        assert got[0, :done_at + 1].isfinite().all()
        torch.testing.assert_close(got[:, :done_at + 1], exact[:, :done_at + 1])
        torch.testing.assert_close(got[1], exact[1])
    upstream = torch.randn(2, 2, 70, generator=torch.Generator().manual_seed(2), dtype=F64)
    upstream[:, 0, done_at - 19] = bad
    grads = torch.autograd.grad((adv * upstream[0] + ret * upstream[1]).sum(), leaves)
    for g in grads[:2]:
        assert g[0, done_at + 1:].isfinite().all() and g[1].isfinite().all()
    assert grads[2].isfinite().all(), "bootstrap_value's gradient"
    clean = upstream.clone()
    clean[:, 0, :done_at + 1] = 0
    adv, ret = fastrlhf.gae(leaves[0], leaves[1], mask, **{**kw, "bootstrap_value": leaves[2]})
    want = torch.autograd.grad((adv * clean[0] + ret * clean[1]).sum(), leaves)
    for g, exact in zip(grads[:2], want):
        torch.testing.assert_close(g[:, done_at + 1:], exact[:, done_at + 1:])
    torch.testing.assert_close(grads[2], want[2])


@pytest.mark.parametrize("mask_mode", ["skip", "zero"])
def test_gradcheck(kernel_backend, mask_mode):
    r, v, mask, dones, boot = inputs(3, 9, seed=16, done_rate=0.2)
    gamma = torch.tensor([0.9, 1.0, 0.5], dtype=F64)
    args = tuple(x.requires_grad_() for x in (r, v, boot))

    def fn(r, v, boot):
        return fastrlhf.gae(r, v, mask, dones=dones, bootstrap_value=boot, gamma=gamma, lam=0.8, returns_lam=0.6,
                            mask_mode=mask_mode)

    assert torch.autograd.gradcheck(fn, args)
    # Second order is the forward op again; projections keep the interpreter's share of it short.
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=kernel_backend == "triton")


def test_gradcheck_packed(kernel_backend):
    g = torch.Generator().manual_seed(17)
    r, v = (torch.randn(12, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    mask, dones = torch.rand(12, generator=g) > 0.3, torch.rand(12, generator=g) < 0.2
    cu = torch.tensor([0, 4, 4, 12])
    assert torch.autograd.gradcheck(
        lambda r, v: fastrlhf.gae(r, v, mask, dones=dones, cu_seqlens=cu, gamma=0.9, lam=0.9), (r, v))


def test_gradients_match_reference_multi_tile(kernel_backend):
    r, v, mask, dones, boot = inputs(2, 1100, seed=18, done_rate=0.01)
    grads = []
    for run in (fastrlhf.gae, reference.gae):
        leaves = [x.clone().requires_grad_() for x in (r, v, boot)]
        adv, ret = run(leaves[0], leaves[1], mask, dones=dones, bootstrap_value=leaves[2], gamma=0.99, lam=0.95)
        weights = torch.randn(2, 2, 1100, generator=torch.Generator().manual_seed(1), dtype=F64)
        grads.append(torch.autograd.grad((adv * weights[0] + ret * weights[1]).sum(), leaves))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


LAYOUTS = {"one-pass": {"MIN_PROGRAMS": 1}, "chunked": {"MIN_CHUNK": 16, "CARRY_BLOCK": 2}}


@pytest.fixture(params=LAYOUTS)
def triton_layout(request, monkeypatch):
    """The Triton kernels in each layout on small shapes: one pass (whole sequences per program), or
    chunked in chunks of 16 positions whose carries are scanned 2 chunks at a time (several scan blocks)."""
    pytest.importorskip("triton")
    kernels = importlib.import_module("fastrlhf.kernels.gae")
    for name, value in LAYOUTS[request.param].items():
        monkeypatch.setattr(kernels, name, value)
    with backend.use_backend("triton"):
        yield request.param


def assert_layout(layout, n, rows):
    """The shape really runs in ``layout`` (so a test of the chunked path cannot pass on the other)."""
    assert importlib.import_module("fastrlhf.kernels.gae")._plan(n, rows)[2] == (layout == "chunked")


@pytest.mark.parametrize("option,B,T", [*((option, 2, 70) for option in OPTIONS), ("dones+bootstrap", 3, 40)],
                         ids=str)
def test_layouts_match_reference(triton_layout, option, B, T):
    """Chunks of 16: T=70 splits into 5 chunks (the first one short), T=40 into 3 (the last one short)."""
    assert_layout(triton_layout, B * T, B)
    r, v, mask, dones, boot = inputs(B, T, seed=B * 100 + T, done_rate=0.05)
    assert_matches_reference(r, v, mask, **build(OPTIONS[option], r, v, mask, dones, boot))


@pytest.mark.parametrize("done_at", [31, 32, 47])
def test_nan_does_not_cross_a_done_at_chunk_edges(triton_layout, done_at):
    """Dones at the last and the first position of a chunk of 16, NaN or inf in the next chunk."""
    assert_layout(triton_layout, 140, 2)
    assert_nan_does_not_cross_a_done(done_at, "value", math.nan)
    assert_nan_does_not_cross_a_done(done_at, "reward", math.inf)


def test_layouts_packed_with_gradients(triton_layout):
    """Packed sequences of 40, 0, 90, 1 and 33 tokens (chunked: 3 + 1 + 6 + 1 + 3 chunks), with holes,
    dones, per-sequence coefficients and bootstrap values, against the reference, gradients included."""
    lengths = [40, 0, 90, 1, 33]
    assert_layout(triton_layout, sum(lengths), len(lengths))
    g = torch.Generator().manual_seed(29)
    n = sum(lengths)
    r, v = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    mask, dones = torch.rand(n, generator=g) > 0.2, torch.rand(n, generator=g) < 0.05
    gamma, boot = torch.rand(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    weights = torch.randn(2, n, generator=g, dtype=F64)
    grads = []
    for run in (fastrlhf.gae, reference.gae):
        leaves = [x.clone().requires_grad_() for x in (r, v, boot)]
        adv, ret = run(leaves[0], leaves[1], mask, dones=dones, cu_seqlens=cu, gamma=gamma, lam=0.9,
                       returns_lam=0.7, bootstrap_value=leaves[2])
        grads.append((adv, ret, *torch.autograd.grad((adv * weights[0] + ret * weights[1]).sum(), leaves)))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("mask_mode", ["skip", "zero"])
def test_layouts_gradcheck(triton_layout, mask_mode):
    """T=33: chunks of 16, 16 and 1."""
    assert_layout(triton_layout, 66, 2)
    r, v, mask, dones, boot = inputs(2, 33, seed=30, done_rate=0.1)
    args = tuple(x.requires_grad_() for x in (r, v, boot))

    def fn(r, v, boot):
        return fastrlhf.gae(r, v, mask, dones=dones, bootstrap_value=boot, gamma=torch.tensor([0.9, 0.5], dtype=F64),
                            lam=0.8, returns_lam=0.6, mask_mode=mask_mode)

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("offsets", [[0, 50, 30, 96], [0, 50, 90], [20, 96], [-30, 50, 120]], ids=str)
def test_layouts_bad_offsets_unchecked_poison_every_output(triton_layout, unchecked_values, offsets):
    assert_layout(triton_layout, 96, len(offsets) - 1)
    r, v, mask, dones, _ = inputs(1, 96, seed=31)
    leaves = [x.view(-1).clone().requires_grad_() for x in (r, v)]
    adv, ret = fastrlhf.gae(*leaves, mask.view(-1), dones=dones.view(-1), cu_seqlens=torch.tensor(offsets), gamma=0.9,
                            lam=0.8)
    assert adv.isnan().all() and ret.isnan().all()
    assert all(g.isnan().all() for g in torch.autograd.grad((adv + ret).sum(), leaves))


def test_layouts_coefficients_outside_unit_interval_unchecked_poison_their_sequence(triton_layout, unchecked_values):
    assert_layout(triton_layout, 120, 3)
    assert_bad_coefficients_poison_their_sequence(40)


def test_layout_fills_the_gpu():
    """Few long rows are chunked into at least 2 programs per SM of a 132-SM GPU; many rows run in one
    pass, with as many programs as rows at T=4096."""
    kernels = pytest.importorskip("fastrlhf.kernels.gae")
    assert kernels._plan(64 * 8192, 64) == (1, 1024, True)
    assert kernels.programs(64 * 8192, 64) == 64 * 8 + 64
    assert kernels._plan(16 * 32768, 16)[2] and kernels.programs(16 * 32768, 16) >= 2 * 132
    assert kernels._plan(512 * 4096, 512) == (1, 1024, False)
    assert kernels.programs(512 * 4096, 512) == 512
    assert not kernels._plan(1024 * 256, 1024)[2]


def test_opcheck(kernel_backend):
    r, v, mask, dones, boot = inputs(3, 11, seed=19)
    args = fastrlhf.ops.gae._canonical(r.requires_grad_(), v.requires_grad_(), mask, 0.9, 0.8, dones, boot, None,
                                       "skip", 0.5)
    torch.library.opcheck(torch.ops.fastrlhf.gae_forward, args)
    grads = (torch.randn(33, dtype=F64), torch.randn(33, dtype=F64))
    torch.library.opcheck(torch.ops.fastrlhf.gae_backward, (*grads, *args[2:4], *args[5:]))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    r, v, mask, _, _ = inputs(4, 16, dtype=torch.float32, seed=20)

    @torch.compile(fullgraph=True, backend=compiler)
    def advantages(r, v, mask):
        adv, ret = fastrlhf.gae(r, v, mask, gamma=0.99, lam=0.95)
        return fastrlhf.masked_whiten(adv, mask), ret

    leaves = [x.clone().requires_grad_() for x in (r, v)]
    got = advantages(*leaves, mask)
    want = reference.gae(r, v, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(got[0], reference.masked_whiten(want[0], mask))
    torch.testing.assert_close(got[1], want[1])
    grads = torch.autograd.grad(got[1].sum(), leaves)
    torch.testing.assert_close(grads, torch.autograd.grad(fastrlhf.gae(*leaves, mask, gamma=0.99, lam=0.95)[1].sum(), leaves))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 80), holes=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["skip", "zero"]))
def test_property_random_shapes_and_masks(B, T, holes, seed, mode):
    r, v, mask, dones, boot = inputs(B, T, seed=seed, holes=holes)
    with backend.use_backend("cpp"), backend.poison_outputs():
        assert_matches_reference(r, v, mask, dones=dones, bootstrap_value=boot, gamma=0.95, lam=0.9, mask_mode=mode)


BAD = [
    ("rewards", lambda r, v, m: fastrlhf.gae(r.long(), v), TypeError),
    ("values", lambda r, v, m: fastrlhf.gae(r, v.float()), TypeError),
    ("values", lambda r, v, m: fastrlhf.gae(r, v[:, :-1]), ValueError),
    ("rewards", lambda r, v, m: fastrlhf.gae(r[0], v[0]), ValueError),
    ("mask", lambda r, v, m: fastrlhf.gae(r, v, m[:, :-1]), ValueError),
    ("dones", lambda r, v, m: fastrlhf.gae(r, v, dones=m.T), ValueError),
    ("gamma", lambda r, v, m: fastrlhf.gae(r, v, gamma=1.5), ValueError),
    ("lam", lambda r, v, m: fastrlhf.gae(r, v, lam=-0.1), ValueError),
    ("lam", lambda r, v, m: fastrlhf.gae(r, v, lam=torch.tensor([0.5, 2.0, 0.5])), ValueError),
    ("gamma", lambda r, v, m: fastrlhf.gae(r, v, gamma=torch.ones(2)), ValueError),
    ("returns_lam", lambda r, v, m: fastrlhf.gae(r, v, returns_lam=3.0), ValueError),
    ("bootstrap_value", lambda r, v, m: fastrlhf.gae(r, v, bootstrap_value=torch.zeros(4)), ValueError),
    ("mask_mode", lambda r, v, m: fastrlhf.gae(r, v, m, mask_mode="mul"), ValueError),
    ("cu_seqlens", lambda r, v, m: fastrlhf.gae(r.view(-1), v.view(-1), cu_seqlens=torch.tensor([0, 5, 3, 12])), ValueError),
    ("cu_seqlens", lambda r, v, m: fastrlhf.gae(r.view(-1), v.view(-1), cu_seqlens=torch.tensor([0, 5, 11])), ValueError),
    ("cu_seqlens", lambda r, v, m: fastrlhf.gae(r.view(-1), v.view(-1), cu_seqlens=torch.tensor([0., 12.])), TypeError),
    ("rewards (packed", lambda r, v, m: fastrlhf.gae(r, v, cu_seqlens=torch.tensor([0, 12])), ValueError),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, call, error):
    r, v, mask, _, _ = inputs(3, 4, seed=23)
    with pytest.raises(error, match=name.replace("(", r"\(")):
        call(r, v, mask)


def test_missing_extension_says_how_to_build(monkeypatch):
    real = backend.importlib.import_module

    def no_extension(name, *a):
        if name == "fastrlhf._C":
            raise ImportError("not built")
        return real(name, *a)

    monkeypatch.setattr(backend.importlib, "import_module", no_extension)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        backend.cpp_ops()


def _direct_forward_args(n=12, rows=3):
    """Valid arguments of ``torch.ops.fastrlhf_cpp.gae_forward`` for ``rows`` sequences of ``n // rows``."""
    g = torch.Generator().manual_seed(25)
    r, v = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    return {"rewards": r, "values": v, "mask": torch.ones(n, dtype=torch.bool), "dones": torch.zeros(n, dtype=torch.bool),
            "bootstrap_value": torch.zeros(rows, dtype=F64), "offsets": torch.arange(0, n + 1, n // rows),
            "gamma": torch.full((rows,), 0.9, dtype=F64), "lam": torch.full((rows,), 0.8, dtype=F64),
            "returns_lam": None, "zero_masked": False, "advantages": torch.empty_like(r), "returns": torch.empty_like(r)}


BAD_DIRECT = [
    ("offsets", {"offsets": torch.tensor([0.0, 12.0])}),
    ("offsets", {"offsets": torch.tensor([0, 4, 2, 12])}),
    ("offsets", {"offsets": torch.tensor([0, 4, 8, 13])}),
    ("offsets", {"offsets": torch.tensor([-1, 4, 8, 12])}),
    ("offsets", {"offsets": torch.tensor([[0, 4], [8, 12]])}),
    ("gamma", {"gamma": torch.full((2,), 0.9, dtype=F64)}),
    ("gamma", {"gamma": torch.full((3,), 0.9)}),
    ("lam", {"lam": torch.full((4,), 0.9, dtype=F64)}),
    ("returns_lam", {"returns_lam": torch.full((2,), 0.9, dtype=F64)}),
    ("mask", {"mask": torch.ones(12, dtype=torch.int32)}),
    ("mask", {"mask": torch.ones(11, dtype=torch.bool)}),
    ("dones", {"dones": torch.zeros(24, dtype=torch.bool)[::2]}),
    ("values", {"values": torch.zeros(12)}),
    ("values", {"values": torch.zeros(24, dtype=F64)[::2]}),
    ("advantages", {"advantages": torch.empty(12)}),
    ("returns", {"returns": torch.empty(13, dtype=F64)}),
    ("bootstrap_value", {"bootstrap_value": torch.zeros(4, dtype=F64)}),
    ("rewards", {"rewards": torch.zeros(12, dtype=torch.int64)}),
]


@pytest.mark.parametrize("name,bad", BAD_DIRECT, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_DIRECT)])
def test_cpp_forward_checks_every_argument(name, bad):
    """A direct call of the C++ op with a bad argument raises, naming it (never reads out of bounds)."""
    args = {**_direct_forward_args(), **bad}
    with pytest.raises(RuntimeError, match=name):
        backend.cpp_ops().gae_forward(*args.values())


@pytest.mark.parametrize("name,bad", [
    ("grad_bootstrap", {"grad_bootstrap": torch.empty(3)}),
    ("grad_bootstrap", {"grad_bootstrap": torch.empty(2, dtype=F64)}),
    ("grad_returns", {"grad_returns": torch.zeros(12)}),
    ("grad_values", {"grad_values": torch.zeros(11, dtype=F64)}),
    ("offsets", {"offsets": torch.tensor([0, 8, 4, 12])}),
])
def test_cpp_backward_checks_every_argument(name, bad):
    f = _direct_forward_args()
    args = {"grad_advantages": f["rewards"], "grad_returns": f["values"], "mask": f["mask"], "dones": f["dones"],
            "offsets": f["offsets"], "gamma": f["gamma"], "lam": f["lam"], "returns_lam": None, "zero_masked": False,
            "grad_rewards": torch.empty(12, dtype=F64), "grad_values": torch.empty(12, dtype=F64),
            "grad_bootstrap": torch.empty(3, dtype=F64)}
    backend.cpp_ops().gae_backward(*args.values())  # the valid call runs
    with pytest.raises(RuntimeError, match=name):
        backend.cpp_ops().gae_backward(*{**args, **bad}.values())


BAD_OFFSETS = [[0, 5, 3, 12], [0, 5, 11], [2, 12], [0, 5, 20], [-3, 5, 12], [0, 13, 12]]


@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=str)
def test_bad_offsets_unchecked_poison_every_output(kernel_backend, unchecked_values, offsets):
    """Without value checks (CUDA's default: no host sync) the Triton kernel makes every output NaN and
    touches nothing outside the N elements; the C++ kernel refuses the offsets itself."""
    r, v, mask, dones, _ = inputs(1, 12, seed=26)
    cu = torch.tensor(offsets)
    args = (r.view(-1), v.view(-1), mask.view(-1))
    kw = dict(dones=dones.view(-1), cu_seqlens=cu, gamma=0.9, lam=0.8)
    if kernel_backend == "cpp":
        with pytest.raises(RuntimeError, match="offsets"):
            fastrlhf.gae(*args, **kw)
        return
    leaves = [x.clone().requires_grad_() for x in args[:2]]
    adv, ret = fastrlhf.gae(*leaves, args[2], **kw)
    assert adv.isnan().all() and ret.isnan().all()
    grads = torch.autograd.grad((adv + ret).sum(), leaves)
    assert all(g.isnan().all() for g in grads)


def test_coefficients_outside_unit_interval_unchecked_poison_their_sequence(kernel_backend, unchecked_values):
    r, v, mask, _, _ = inputs(3, 20, seed=27)
    gamma = torch.tensor([0.9, 1.5, 0.8], dtype=F64)
    if kernel_backend == "cpp":
        with pytest.raises(RuntimeError, match="gamma"):
            fastrlhf.gae(r, v, mask, gamma=gamma)
        return
    assert_bad_coefficients_poison_their_sequence(20)


def assert_bad_coefficients_poison_their_sequence(T):
    """gamma of sequence 1 and lam of sequence 2 outside [0, 1]: their outputs and gradients NaN, the rest
    exact."""
    r, v, mask, dones, boot = inputs(3, T, seed=27)
    gamma = torch.tensor([0.9, 1.5, 0.8], dtype=F64)
    leaves = [x.clone().requires_grad_() for x in (r, v, boot)]
    adv, ret = fastrlhf.gae(leaves[0], leaves[1], mask, dones=dones, bootstrap_value=leaves[2], gamma=gamma,
                            lam=torch.tensor([0.9, 0.9, -0.1], dtype=F64))
    want = reference.gae(r, v, mask, dones=dones, bootstrap_value=boot, gamma=gamma, lam=0.9)
    for got, exact in zip((adv, ret), want):
        assert got[1:].isnan().all()
        torch.testing.assert_close(got[0], exact[0])
    for g in torch.autograd.grad((adv + ret).sum(), leaves):
        assert g[1:].isnan().all() and g[0].isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    r, v, mask, dones, boot = (x.cuda() for x in inputs(4, 300, dtype=torch.float32, seed=28))
    cu = torch.tensor([0, 100, 100, 700, 1200], device="cuda")
    gamma = torch.full((4,), 0.9, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        leaves = [x.clone().requires_grad_() for x in (r, v, boot)]
        adv, ret = fastrlhf.gae(leaves[0], leaves[1], mask, dones=dones, bootstrap_value=leaves[2], gamma=gamma,
                                lam=0.95)
        torch.autograd.grad((adv + ret).sum(), leaves)
        fastrlhf.gae(r.view(-1), v.view(-1), mask.view(-1), cu_seqlens=cu, gamma=gamma, lam=0.9)
        fastrlhf.masked_whiten(adv, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
