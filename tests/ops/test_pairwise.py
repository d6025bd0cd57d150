"""fastrlhf.pairwise_sigmoid_loss, dpo_loss and reward_model_loss against plain-torch float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf import backend, reference
from fastrlhf.bench import pairwise as bench
from fastrlhf.ops.pairwise import _canonical_reward_model

F64 = torch.float64
LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"]


def randn(*shape, seed, dtype=F64, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale).to(dtype)


def run_both(fn, ref, leaves, **kwargs):
    """(result, gradients of a random projection of the loss) of the op and of the reference."""
    out = []
    for impl in (fn, ref):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        result = impl(*xs, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        weights = randn(*loss.shape, seed=99)
        out.append((result, torch.autograd.grad((loss * weights).sum(), xs)))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [None, "tensor", 0.3])
@pytest.mark.parametrize("beta,label_smoothing", [(1.0, 0.0), (0.5, 0.2)])
def test_pairwise_matches_reference(kernel_backend, reduction, margin, beta, label_smoothing):
    chosen, rejected = randn(37, seed=1, scale=3), randn(37, seed=2, scale=3)
    margin = randn(37, seed=3) if margin == "tensor" else margin
    leaves = [chosen, rejected] + ([margin] if isinstance(margin, torch.Tensor) else [])

    def call(impl):
        def run(chosen, rejected, m=margin):
            return impl(chosen, rejected, margin=m, beta=beta, label_smoothing=label_smoothing, reduction=reduction)
        return run

    (got, got_grads), (want, want_grads) = run_both(call(fastrlhf.pairwise_sigmoid_loss),
                                                    call(reference.pairwise_sigmoid_loss), leaves)
    assert got.dtype == F64 and got.shape == want.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dpo_matches_trl_formulas(kernel_backend, loss_type, reduction):
    logps = [randn(2, 29, seed=10 + k, scale=4) for k in range(4)]
    smoothing = 0.15 if loss_type in ("sigmoid", "robust") else 0.0
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=smoothing, reduction=reduction)
    (got, got_grads), (want, want_grads) = run_both(fastrlhf.dpo_loss, reference.dpo_loss, logps, **kw)
    assert got[0].shape == want[0].shape == ((2, 29) if reduction == "none" else ())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


def reward_inputs(B, T, seed, side, dtype=F64):
    chosen, rejected, chosen_mask, rejected_mask = bench.reward_model_inputs(B, T, dtype, seed=seed, side=side)
    if side == "holes":  # masked tokens inside the sequences too, and a row whose only token is the first
        holes = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.4
        chosen_mask, rejected_mask = chosen_mask & holes, rejected_mask & holes.flip(1)
        chosen_mask[:, 0] = rejected_mask[:, T // 2] = True
        chosen_mask[0] = False
        chosen_mask[0, 0] = True
    logprobs = -torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype) * 4
    return chosen.detach(), rejected.detach(), chosen_mask, rejected_mask, logprobs


OPTIONS = {
    "plain": {},
    "margin+center": {"margin": "tensor", "rank_coef": 0.7, "center_coef": 0.05},
    "lm": {"lm_coef": 0.3, "center_coef": 0.01, "margin": 0.5},
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("side", ["right", "left", "holes"])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 40), (3, 1500)])
def test_reward_model_matches_reference(kernel_backend, option, side, B, T):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(B, T, B * T, side if T > 1 else "right")
    kw = dict(OPTIONS[option], chosen_mask=chosen_mask, rejected_mask=rejected_mask)
    if kw.get("margin") == "tensor":
        kw["margin"] = randn(B, seed=4)
    leaves = [chosen, rejected]
    if "lm_coef" in kw:
        leaves.append(logprobs)

    def call(impl):
        def run(chosen, rejected, logprobs=None):
            return impl(chosen, rejected, chosen_logprobs=logprobs, **kw)
        return run

    (got, got_grads), (want, want_grads) = run_both(call(fastrlhf.reward_model_loss),
                                                    call(reference.reward_model_loss), leaves)
    assert got[0].shape == () and set(got[1]) == set(want[1])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


def test_reward_model_pools_the_last_unmasked_token(kernel_backend):
    """Written out by hand: the value at the last set mask position, whatever the padding."""
    values = torch.arange(12, dtype=F64).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.int64)
    zeros = torch.zeros(3, 1, dtype=F64)
    _, stats = fastrlhf.reward_model_loss(values, zeros, chosen_mask=mask, rejected_mask=torch.ones(3, 1))
    assert stats["chosen_reward"].item() == (1 + 7 + 10) / 3
    assert stats["rejected_reward"].item() == 0


def test_reward_model_gradient_lands_on_pooled_tokens_only(kernel_backend):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(4, 30, 7, "holes")
    chosen.requires_grad_()
    loss, _ = fastrlhf.reward_model_loss(chosen, rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask)
    (grad,) = torch.autograd.grad(loss, chosen)
    last = 29 - chosen_mask.long().fliplr().argmax(1)
    expected_support = torch.zeros_like(chosen_mask)
    expected_support[torch.arange(4), last] = True
    assert (grad != 0).eq(expected_support).all()


@pytest.mark.parametrize("garbage", [math.nan, -math.inf, 1e30])
def test_garbage_at_masked_tokens_changes_nothing(kernel_backend, garbage):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(4, 50, 8, "holes")
    kw = dict(chosen_mask=chosen_mask, rejected_mask=rejected_mask, lm_coef=0.5, center_coef=0.1)
    clean = fastrlhf.reward_model_loss(chosen, rejected, chosen_logprobs=logprobs, **kw)
    dirty = fastrlhf.reward_model_loss(chosen.masked_fill(~chosen_mask, garbage),
                                       rejected.masked_fill(~rejected_mask, garbage),
                                       chosen_logprobs=logprobs.masked_fill(~chosen_mask, garbage), **kw)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_left_and_right_padding_give_the_same_loss(kernel_backend):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(6, 33, 9, "right")
    lengths = [chosen_mask.sum(1), rejected_mask.sum(1)]

    def left(x, n):  # roll each row so its valid tokens end at the last column
        return torch.stack([row.roll(int(33 - k)) for row, k in zip(x, n)])

    kw = dict(center_coef=0.1, lm_coef=0.2)
    right = fastrlhf.reward_model_loss(chosen, rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
                                       chosen_logprobs=logprobs, **kw)
    left_padded = fastrlhf.reward_model_loss(
        left(chosen, lengths[0]), left(rejected, lengths[1]), chosen_mask=left(chosen_mask, lengths[0]),
        rejected_mask=left(rejected_mask, lengths[1]), chosen_logprobs=left(logprobs, lengths[0]), **kw)
    torch.testing.assert_close(left_padded, right)


def test_stats_count_a_tie_as_half(kernel_backend):
    chosen = torch.tensor([2.0, 1.0, 0.0, 5.0], dtype=F64)
    rejected = torch.tensor([1.0, 1.0, 3.0, 5.0], dtype=F64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    _, stats = fastrlhf.reward_model_loss(chosen[:, None], rejected[:, None], chosen_mask=mask, rejected_mask=mask)
    assert stats["accuracy"].item() == (1 + 0.5 + 0 + 0.5) / 4
    assert stats["tie_rate"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(-0.5)
    _, stats = fastrlhf.dpo_loss(chosen, rejected, torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64), beta=2.0)
    assert stats["chosen_reward"].item() == pytest.approx(4.0)
    assert stats["accuracy"].item() == 0.5 and not stats["accuracy"].requires_grad


GAPS = torch.tensor([-1e4, -300.0, -90.0, -20.0, 0.0, 20.0, 90.0, 300.0, 1e4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_gaps_are_finite_and_wrong_pairs_keep_their_gradient(kernel_backend, dtype):
    if kernel_backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16")
    if dtype == torch.float16:
        gaps = GAPS.clamp(-6e4, 6e4)
    else:
        gaps = GAPS
    chosen = gaps.to(dtype).requires_grad_()
    rejected = torch.zeros_like(chosen, requires_grad=True)
    beta = 0.5
    losses = fastrlhf.pairwise_sigmoid_loss(chosen, rejected, beta=beta, reduction="none")
    exact = F.softplus(-beta * chosen.detach().double())
    assert losses.isfinite().all()
    torch.testing.assert_close(losses.double(), exact, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(losses.sum(), chosen)
    # d/d chosen = -beta * sigmoid(-beta d): -beta for badly wrong pairs, 0 for right ones, never NaN
    torch.testing.assert_close(grad.double(), -beta * torch.sigmoid(-beta * chosen.detach().double()),
                               rtol=1e-2, atol=torch.finfo(dtype).tiny)
    assert grad[0].item() == -beta


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_large_gaps_are_finite(kernel_backend, loss_type):
    policy = (GAPS * 10).requires_grad_()
    zeros = torch.zeros_like(policy)
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    got, stats = fastrlhf.dpo_loss(policy, zeros, zeros, zeros, beta=1.0, loss_type=loss_type,
                                   label_smoothing=smoothing, reduction="none")
    want, _ = reference.dpo_loss(policy.double(), zeros.double(), zeros.double(), zeros.double(), beta=1.0,
                                 loss_type=loss_type, label_smoothing=smoothing, reduction="none")
    assert got.isfinite().all() and all(s.isfinite() for s in stats.values())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), policy)
    assert grad.isfinite().all()


def test_reward_model_large_gap(kernel_backend):
    chosen = torch.tensor([[-1e4, 0.0]]).requires_grad_()
    rejected = torch.tensor([[1e4]]).requires_grad_()
    loss, _ = fastrlhf.reward_model_loss(chosen, rejected, chosen_mask=torch.tensor([[True, False]]),
                                         rejected_mask=torch.tensor([[True]]))
    assert loss.item() == 2e4
    grad_chosen, grad_rejected = torch.autograd.grad(loss, (chosen, rejected))
    assert grad_chosen.tolist() == [[-1.0, 0.0]] and grad_rejected.tolist() == [[1.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(kernel_backend, dtype):
    """The verify checks: loss and gradients within 2x PyTorch's own error in ``dtype`` (against float64)."""
    if kernel_backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16")
    for check in bench.checks():
        if check.dtype == dtype:
            for name, (error, bound) in check.run(torch.device("cpu")).items():
                assert error <= bound, f"{check.op} {check.shape} {name}: {error} > {bound}"


def test_gradcheck_pairwise(kernel_backend):
    leaves = [randn(6, seed=k, scale=2).requires_grad_() for k in range(3)]
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda c, r, m: fastrlhf.pairwise_sigmoid_loss(
            c, r, margin=m, beta=0.8, label_smoothing=0.1, reduction=reduction), leaves)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_dpo(kernel_backend, loss_type):
    leaves = [randn(5, seed=20 + k, scale=2).requires_grad_() for k in range(4)]
    smoothing = 0.2 if loss_type in ("sigmoid", "robust") else 0.0
    assert torch.autograd.gradcheck(lambda *xs: fastrlhf.dpo_loss(
        *xs, beta=0.3, loss_type=loss_type, label_smoothing=smoothing, reduction="sum")[0], leaves)


def test_gradcheck_reward_model(kernel_backend):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(3, 7, 30, "holes")
    leaves = [x.requires_grad_() for x in (chosen, rejected, logprobs)]
    assert torch.autograd.gradcheck(lambda c, r, lp: fastrlhf.reward_model_loss(
        c, r, chosen_mask=chosen_mask, rejected_mask=rejected_mask, margin=0.2, rank_coef=0.9, center_coef=0.3,
        chosen_logprobs=lp, lm_coef=0.4)[0], leaves)


def test_double_backward_raises():
    chosen = randn(4, seed=1).requires_grad_()
    loss = fastrlhf.pairwise_sigmoid_loss(chosen, randn(4, seed=2))
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, chosen, create_graph=True)


def test_no_grad_fast_path_equals_the_registered_op(kernel_backend):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(4, 20, 31, "left")
    kw = dict(chosen_mask=chosen_mask, rejected_mask=rejected_mask, chosen_logprobs=logprobs, lm_coef=0.1)
    with torch.no_grad():
        fast = fastrlhf.reward_model_loss(chosen, rejected, **kw)
    torch.testing.assert_close(fastrlhf.reward_model_loss(chosen.requires_grad_(), rejected, **kw), fast)


def test_opcheck(kernel_backend):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(3, 9, 32, "holes")
    pairs = [randn(5, seed=k).requires_grad_() for k in range(5)]
    for reduction in (0, 1):
        torch.library.opcheck(torch.ops.fastrlhf.pairwise_forward, (*pairs, 0.3, 0.1, 3, reduction, 0.3))
    torch.library.opcheck(torch.ops.fastrlhf.pairwise_forward, (*pairs[:2], None, None, None, 1.0, 0.0, 0, 2, 1.0))
    args = _canonical_reward_model(chosen.requires_grad_(), rejected.requires_grad_(), chosen_mask, rejected_mask,
                                   randn(3, seed=5), logprobs.requires_grad_(), 1.0, 0.1, 0.2)
    torch.library.opcheck(torch.ops.fastrlhf.reward_model_forward, args)
    with torch.no_grad():
        _, stats, factors, index = torch.ops.fastrlhf.reward_model_forward(*args)
    for dtypes in ((F64, torch.float32), (F64, None)):
        torch.library.opcheck(torch.ops.fastrlhf.reward_model_backward,
                              (torch.tensor(0.7, dtype=F64), factors, index, stats, chosen_mask, rejected_mask, 0.2,
                               *dtypes))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(4, 16, 33, "left", torch.float32)
    logps = [randn(4, seed=40 + k, dtype=torch.float32) for k in range(4)]

    def losses(fns, chosen, rejected, logprobs, policy):
        pairwise, dpo, reward_model = fns
        rm, rm_stats = reward_model(chosen, rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
                                    chosen_logprobs=logprobs, lm_coef=0.1, center_coef=0.01)
        d, d_stats = dpo(policy, *logps[1:], beta=0.1, loss_type="robust", label_smoothing=0.1)
        return rm + d + pairwise(policy, logps[1], margin=logps[2]), rm_stats["accuracy"], d_stats["margin"]

    fused = torch.compile(lambda *xs: losses((fastrlhf.pairwise_sigmoid_loss, fastrlhf.dpo_loss,
                                              fastrlhf.reward_model_loss), *xs), fullgraph=True, backend=compiler)
    plain = lambda *xs: losses((reference.pairwise_sigmoid_loss, reference.dpo_loss,  # noqa: E731
                                reference.reward_model_loss), *xs)
    results = []
    for fn in (fused, plain):
        leaves = [x.clone().requires_grad_() for x in (chosen, rejected, logprobs, logps[0])]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out[0], leaves)))
    torch.testing.assert_close(results[0], results[1])


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 70), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_property_random_masks(B, T, density, seed):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(B, T, generator=g) < density for _ in range(2)]
    for m in masks:
        m[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
    chosen, rejected, logprobs = (torch.randn(B, T, generator=g, dtype=F64) for _ in range(3))
    kw = dict(chosen_mask=masks[0], rejected_mask=masks[1], chosen_logprobs=logprobs, lm_coef=0.3, center_coef=0.2)
    with backend.use_backend("cpp"), backend.poison_outputs():
        torch.testing.assert_close(fastrlhf.reward_model_loss(chosen, rejected, **kw),
                                   reference.reward_model_loss(chosen, rejected, **kw))


def test_a_row_with_no_unmasked_token_raises(kernel_backend):
    chosen, rejected, chosen_mask, rejected_mask, _ = reward_inputs(4, 10, 34, "right")
    rejected_mask[2] = False
    with pytest.raises(ValueError, match="rejected_mask: .* row 2 has none"):
        fastrlhf.reward_model_loss(chosen, rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask)


def _rm(**overrides):
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(3, 4, 35, "right")
    kw = dict(chosen_mask=chosen_mask, rejected_mask=rejected_mask)
    args = {"chosen_values": chosen, "rejected_values": rejected, **kw, **overrides}
    return lambda: fastrlhf.reward_model_loss(args.pop("chosen_values"), args.pop("rejected_values"), **args)


def _dpo(*logps, **kw):
    base = [randn(3, seed=k) for k in range(4)]
    for k, x in enumerate(logps):
        base[k] = x
    return lambda: fastrlhf.dpo_loss(*base, **kw)


BAD = [
    ("chosen", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3, dtype=torch.long), torch.ones(3)), TypeError),
    ("rejected", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3), torch.ones(4)), ValueError),
    ("rejected", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3), torch.ones(3, dtype=F64)), TypeError),
    ("chosen: expected at least one pair", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(0), torch.ones(0)),
     ValueError),
    ("margin", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3), torch.ones(3), margin=torch.ones(2)), ValueError),
    ("beta", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3), torch.ones(3), beta=0.0), ValueError),
    ("label_smoothing", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3), torch.ones(3), label_smoothing=1.5),
     ValueError),
    ("reduction", lambda: fastrlhf.pairwise_sigmoid_loss(torch.ones(3), torch.ones(3), reduction="avg"), ValueError),
    ("loss_type", _dpo(loss_type="kto"), ValueError),
    ("ref_rejected_logps", _dpo(torch.ones(3, dtype=F64), torch.ones(3, dtype=F64), torch.ones(3, dtype=F64),
                                torch.ones(4, dtype=F64)), ValueError),
    ("label_smoothing: expected 0", _dpo(loss_type="ipo", label_smoothing=0.1), ValueError),
    ("label_smoothing: expected a value below 0.5", _dpo(loss_type="robust", label_smoothing=0.5), ValueError),
    ("chosen_values: expected 2-D", _rm(chosen_values=torch.ones(3, dtype=F64)), ValueError),
    ("chosen_values: expected at least one pair", _rm(chosen_values=torch.ones(0, 4, dtype=F64),
                                                      rejected_values=torch.ones(0, 4, dtype=F64)), ValueError),
    ("rejected_values", _rm(rejected_values=torch.ones(2, 4, dtype=F64)), ValueError),
    ("rejected_values", _rm(rejected_values=torch.ones(3, 4)), TypeError),
    ("chosen_mask", _rm(chosen_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError),
    ("rejected_mask", _rm(rejected_mask=[1, 1]), TypeError),
    ("chosen_logprobs: expected a", _rm(lm_coef=0.1), ValueError),
    ("chosen_logprobs", _rm(chosen_logprobs=torch.ones(3, 5)), ValueError),
    ("margin", _rm(margin=torch.ones(4, dtype=F64)), ValueError),
    ("chosen_mask: expected at least one unmasked token in every row, row 0",
     _rm(chosen_values=torch.ones(3, 0, dtype=F64), chosen_mask=torch.ones(3, 0)), ValueError),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[f"{b[0].split(':')[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, call, error):
    with pytest.raises(error, match=name):
        call()


def _direct_reward_model(rows=3, length=4):
    """Valid arguments of ``torch.ops.fastrlhf_cpp.reward_model_forward`` and ``_backward``, as dicts."""
    chosen, rejected, chosen_mask, rejected_mask, logprobs = reward_inputs(rows, length, 36, "right")
    forward = {"chosen_values": chosen, "rejected_values": rejected, "chosen_mask": chosen_mask,
               "rejected_mask": rejected_mask, "margin": randn(rows, seed=3), "chosen_logprobs": logprobs,
               "rank_coef": 1.0, "center_coef": 0.1, "lm_coef": 0.2, "loss": torch.empty((), dtype=F64),
               "stats": torch.empty(6, dtype=F64), "factors": torch.empty(2, rows, dtype=F64),
               "index": torch.empty(2, rows, dtype=torch.int64)}
    backend.cpp_ops().reward_model_forward(*forward.values())
    backward = {"grad_loss": torch.tensor(1.0, dtype=F64), "factors": forward["factors"], "index": forward["index"],
                "stats": forward["stats"], "chosen_mask": chosen_mask, "lm_coef": 0.2, "has_lm": True,
                "grad_chosen": torch.empty_like(chosen), "grad_rejected": torch.empty_like(rejected),
                "grad_logprobs": torch.empty_like(logprobs)}
    return forward, backward


BAD_DIRECT_FORWARD = [
    ("margin", {"margin": randn(6, seed=1)[::2]}),
    ("margin", {"margin": randn(4, seed=1)}),
    ("margin", {"margin": randn(3, seed=1, dtype=torch.float32)}),
    ("chosen_values", {"chosen_values": randn(3, seed=1)}),
    ("chosen_mask", {"chosen_mask": torch.ones(3, 4, dtype=torch.int32)}),
    ("rejected_mask", {"rejected_mask": torch.ones(3, 5, dtype=torch.bool)}),
    ("chosen_logprobs", {"chosen_logprobs": torch.ones(3, 4, dtype=torch.int64)}),
    ("index", {"index": torch.empty(2, 3, dtype=torch.int32)}),
    ("stats", {"stats": torch.empty(5, dtype=F64)}),
    ("factors", {"factors": torch.empty(2, 3)}),
    ("loss", {"loss": torch.empty(2, dtype=F64)}),
]


@pytest.mark.parametrize("name,bad", BAD_DIRECT_FORWARD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_DIRECT_FORWARD)])
def test_cpp_reward_model_forward_checks_every_argument(name, bad):
    forward, _ = _direct_reward_model()
    with pytest.raises(RuntimeError, match=name):
        backend.cpp_ops().reward_model_forward(*{**forward, **bad}.values())


BAD_DIRECT_BACKWARD = [
    ("index", {"index": torch.tensor([[0, 1, 4], [0, 0, 0]])}),
    ("index", {"index": torch.tensor([[0, 1, 2], [0, -2, 0]])}),
    ("index", {"index": torch.tensor([[0, 1, 2], [0, 0, 10**12]])}),
    ("stats", {"stats": torch.empty(5, dtype=F64)}),
    ("stats", {"stats": torch.empty(6)}),
    ("grad_loss", {"grad_loss": torch.ones(2, dtype=F64)}),
    ("factors", {"factors": torch.empty(2, 2, dtype=F64)}),
    ("factors", {"factors": torch.empty(2, 3, dtype=torch.float16)}),
    ("chosen_mask", {"chosen_mask": torch.ones(3, 5, dtype=torch.bool)}),
    ("grad_rejected", {"grad_rejected": torch.empty(2, 4, dtype=F64)}),
    ("grad_logprobs", {"grad_logprobs": torch.empty(3, 5, dtype=F64)}),
]


@pytest.mark.parametrize("name,bad", BAD_DIRECT_BACKWARD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_DIRECT_BACKWARD)])
def test_cpp_reward_model_backward_checks_every_argument(name, bad):
    """An index past the row used to be written to (out of bounds; a segfault for a large one)."""
    _, backward = _direct_reward_model()
    backend.cpp_ops().reward_model_backward(*backward.values())  # the valid call runs
    with pytest.raises(RuntimeError, match=name):
        backend.cpp_ops().reward_model_backward(*{**backward, **bad}.values())


@pytest.mark.parametrize("name,bad", [
    ("chosen", {"chosen": torch.ones(3, dtype=torch.int64)}),
    ("rejected", {"rejected": randn(6, seed=2)[::2]}),
    ("margin", {"margin": randn(6, seed=2)[::2]}),
    ("loss_type", {"loss_type": 7}),
    ("reduction", {"reduction": -1}),
    ("loss", {"loss": torch.empty(3, dtype=F64)}),
    ("factors", {"factors": torch.empty(2, 3)}),
])
def test_cpp_pairwise_forward_checks_every_argument(name, bad):
    args = {"chosen": randn(3, seed=0), "rejected": randn(3, seed=1), "ref_chosen": None, "ref_rejected": None,
            "margin": randn(3, seed=2), "beta": 0.5, "label_smoothing": 0.0, "loss_type": 0, "reduction": 1,
            "reward_scale": 1.0, "loss": torch.empty((), dtype=F64), "stats": torch.empty(6, dtype=F64),
            "factors": torch.empty(2, 3, dtype=F64)}
    backend.cpp_ops().pairwise_forward(*args.values())
    with pytest.raises(RuntimeError, match=name):
        backend.cpp_ops().pairwise_forward(*{**args, **bad}.values())


def test_a_row_with_no_unmasked_token_unchecked_gives_nan(kernel_backend, unchecked_values):
    """Without value checks (CUDA's default: no host sync) the row's reward is NaN, and so is the loss."""
    chosen, rejected, chosen_mask, rejected_mask, _ = reward_inputs(4, 10, 34, "right")
    rejected_mask[2] = False
    loss, stats = fastrlhf.reward_model_loss(chosen, rejected, chosen_mask=chosen_mask, rejected_mask=rejected_mask)
    assert loss.isnan() and stats["rejected_reward"].isnan()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    chosen, rejected, chosen_mask, rejected_mask, logprobs = (
        t.cuda() for t in reward_inputs(8, 30, 37, "left", torch.float32))
    pairs = [randn(64, seed=k, dtype=torch.float32).cuda().requires_grad_() for k in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = fastrlhf.reward_model_loss(chosen.requires_grad_(), rejected, chosen_mask=chosen_mask,
                                             rejected_mask=rejected_mask, chosen_logprobs=logprobs, lm_coef=0.1)
        loss.backward()
        fastrlhf.dpo_loss(*pairs, beta=0.1)[0].backward()
        fastrlhf.pairwise_sigmoid_loss(*pairs[:2], margin=0.5).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pairs_spread_over_programs_with_a_fixed_order_reduction(monkeypatch):
    """1000 pairs run on several programs of pairs_kernel, whose partial sums one program adds in a fixed
    order: the loss and statistics match the reference and repeat bit for bit."""
    from fastrlhf.kernels import pairwise as kernels

    grids = []
    launch = kernels.pairs_kernel

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return launch[grid]

    monkeypatch.setattr(kernels, "pairs_kernel", Recorded())
    chosen, rejected, margin = (randn(1000, seed=k) for k in range(3))
    with backend.use_backend("triton"):
        got = [fastrlhf.pairwise_sigmoid_loss(chosen, rejected, margin=margin, beta=0.7) for _ in range(2)]
        stats = fastrlhf.dpo_loss(chosen, rejected, margin, rejected, beta=0.3)[1]
    assert grids[0] == (math.ceil(1000 / kernels.PAIR_BLOCK),) and grids[0][0] > 1
    want = reference.pairwise_sigmoid_loss(chosen, rejected, margin=margin, beta=0.7)
    torch.testing.assert_close(got[0], want)
    assert torch.equal(got[0], got[1])
    want_stats = reference.dpo_loss(chosen, rejected, margin, rejected, beta=0.3)[1]
    for name, value in want_stats.items():
        torch.testing.assert_close(stats[name], value, msg=name)
