"""fastrlhf.policy_loss against the plain-torch float64 reference, on every kernel backend."""

import pytest
import torch

import fastrlhf
from fastrlhf import backend, reference
from fastrlhf.ops import policy_loss as op

F64 = torch.float64
LOSS_TYPES = list(op.LOSS_TYPES)
AGGREGATIONS = list(op.AGGREGATIONS)
ESTIMATORS = [*op.KL_ESTIMATORS, *(e + "+" for e in op.KL_ESTIMATORS)]


def inputs(B, T, seed, dtype=F64, drift=0.3):
    """Log-probs whose ratios straddle the clip range, advantages of both signs, holes in the mask and one
    fully masked row; garbage (NaN, inf) at masked tokens."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=F64) * drift
    ref = old + torch.randn(B, T, generator=g, dtype=F64) * drift
    adv = torch.randn(B, T, generator=g, dtype=F64)
    entropy = torch.rand(B, T, generator=g, dtype=F64) * 2
    isw = torch.rand(B, T, generator=g, dtype=F64) * 1.5 + 0.25
    mask = torch.rand(B, T, generator=g) > 0.25
    if B > 2:
        mask[1] = False
    for x, poison in ((logp, float("nan")), (old, float("inf")), (adv, float("nan")), (ref, -float("inf")),
                      (entropy, float("nan")), (isw, float("nan"))):
        x[~mask] = poison
    return [x.to(dtype) for x in (logp, old, adv, ref, entropy, isw)] + [mask]


def run(impl, logp, entropy, *args, **kw):
    """(loss, metrics, grad logp, grad entropy) of ``impl`` for the gradient of ``3 * loss``."""
    logp = logp.detach().clone().requires_grad_()
    entropy = entropy.detach().clone().requires_grad_()
    loss, metrics = impl(logp, *args, entropy=entropy, **kw)
    grads = torch.autograd.grad(3 * loss, (logp, entropy), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (logp, entropy))]
    return loss, metrics, *(torch.where(torch.isnan(g), 0, g) for g in grads)


def assert_matches(logp, old, adv, ref, entropy, isw, mask, **kw):
    got = run(fastrlhf.policy_loss, logp, entropy, old, adv, mask, ref_logp=ref, rollout_is_weights=isw, **kw)
    want = run(reference.policy_loss, logp, entropy, old, adv, mask, ref_logp=ref, rollout_is_weights=isw, **kw)
    assert got[0].dtype == (F64 if logp.dtype == F64 else torch.float32) and got[0].shape == ()
    torch.testing.assert_close(got[0], want[0], msg=lambda m: f"loss: {m}")
    assert set(got[1]) == set(want[1]) == set(op.METRICS)
    for name in op.METRICS:
        assert got[1][name].dtype == torch.float32 and got[1][name].shape == ()
        torch.testing.assert_close(got[1][name], want[1][name], msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got[2], want[2], msg=lambda m: f"grad logp: {m}")
    torch.testing.assert_close(got[3], want[3], msg=lambda m: f"grad entropy: {m}")
    return got


def options(loss_type, k):
    """A varied configuration per loss type (k picks the KL estimator and the clip variant)."""
    kw = dict(loss_type=loss_type, kl_coef=0.1, kl_estimator=ESTIMATORS[k % len(ESTIMATORS)], entropy_coef=0.01)
    if loss_type == "ppo":
        kw["dual_clip"] = 3.0 if k % 2 == 0 else None
    if loss_type in ("ppo", "cispo") and k % 3 == 1:
        kw["clip_low"] = None
    if loss_type == "cispo":
        kw["clip_high"] = 0.28
    return kw


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_matches_reference(loss_type, aggregation):
    k = AGGREGATIONS.index(aggregation) + 5 * LOSS_TYPES.index(loss_type)
    data = inputs(4, 37, seed=k, drift=0.6 if loss_type == "gspo" else 0.3)
    got = assert_matches(*data, aggregation=aggregation, **options(loss_type, k))
    assert got[1]["policy_loss"] != 0 and got[1]["kl"] != 0 and got[1]["entropy"] != 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_estimators(estimator):
    # Large drift: k3's clamps bind on some tokens (value clamped at 10, gradient 0).
    logp, old, adv, ref, entropy, isw, mask = inputs(3, 50, seed=3, drift=4.0)
    assert_matches(logp, old, adv, ref, entropy, isw, mask, kl_coef=0.5, kl_estimator=estimator,
                   kl_aggregation="seq-mean-token-mean", entropy_aggregation="token-sum", entropy_coef=0.2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kernel_backends(kernel_backend, loss_type):
    k = LOSS_TYPES.index(loss_type)
    assert_matches(*inputs(3, 29, seed=40 + k), aggregation=AGGREGATIONS[k], **options(loss_type, 2 * k))


def test_fp32_inputs(kernel_backend):
    data = inputs(3, 40, seed=7, dtype=torch.float32)
    assert_matches(*data, **options("ppo", 0))


def test_defaults_and_terms_off():
    logp, old, adv, ref, entropy, isw, mask = inputs(2, 9, seed=8)
    loss, metrics = fastrlhf.policy_loss(logp, old, adv, mask)
    want, want_metrics = reference.policy_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss, want)
    assert metrics["kl"] == 0 and metrics["entropy"] == 0 and metrics["dual_clipfrac"] == 0
    # A given ref_logp with kl_coef 0 (and entropy with coefficient 0) is an off term.
    loss2, metrics2 = fastrlhf.policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=entropy)
    assert loss2 == loss and metrics2["kl"] == 0


def test_metrics_by_hand():
    """Three tokens written out: ratios 1.5 (A > 0: clipped high), 0.5 (A < 0: clipped low), 1 (not)."""
    import math
    old = torch.zeros(1, 4, dtype=F64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, 7.0]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    loss, m = fastrlhf.policy_loss(logp, old, adv, mask, dual_clip=1.2)
    # token losses: -1 * 1.2 (clipped), then A < 0: max(0.5, 0.8) = 0.8 -> min(0.8, 1.2) = 0.8, then -2
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 - 2.0) / 3, dtype=F64))
    assert m["clipfrac"] == pytest.approx(2 / 3) and m["clipfrac_low"] == pytest.approx(1 / 3)
    assert m["clipfrac_high"] == pytest.approx(1 / 3) and m["dual_clipfrac"] == 0
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["ratio_mean"] == pytest.approx(1.0)
    assert m["ppo_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3)


# cispo's gradient -sg(clip(r)) A is by design not the derivative of its value -clip(r) A logp.
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "cispo"])
def test_gradcheck(loss_type):
    logp, old, adv, ref, entropy, isw, mask = inputs(3, 6, seed=11)
    logp = torch.where(mask, logp, 0.0).requires_grad_()
    entropy = torch.where(mask, entropy, 0.0).requires_grad_()
    kw = dict(options(loss_type, 3), aggregation="seq-mean-token-mean")
    if loss_type == "gspo":
        # The token form's gradient is the derivative of the sequence objective only where every token of a
        # sequence carries the same weight: one advantage per sequence, no per-token IS weights.
        adv, isw = torch.where(mask, adv, 0.0).sum(-1), None

    def f(logp, entropy):
        return fastrlhf.policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=entropy, rollout_is_weights=isw,
                                    **kw)[0]

    assert torch.autograd.gradcheck(f, (logp, entropy))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_add_up(aggregation):
    """4 micro-batches with the global counts give the loss, metrics sums and gradients of one batch."""
    logp, old, adv, ref, entropy, isw, mask = inputs(8, 21, seed=12)
    kw = dict(loss_type="ppo", dual_clip=3.0, kl_coef=0.2, entropy_coef=0.05, aggregation=aggregation,
              kl_aggregation="token-mean", entropy_aggregation="seq-mean-token-mean")
    counts = dict(num_tokens=mask.sum(), num_sequences=int(mask.any(-1).sum()))
    whole = run(fastrlhf.policy_loss, logp, entropy, old, adv, mask, ref_logp=ref, rollout_is_weights=isw, **kw)
    parts = [run(fastrlhf.policy_loss, logp[r], entropy[r], old[r], adv[r], mask[r], ref_logp=ref[r],
                 rollout_is_weights=isw[r], **kw, **counts) for r in torch.arange(8).chunk(4)]
    torch.testing.assert_close(sum(p[0] for p in parts), whole[0])
    for name in ("policy_loss", "kl", "entropy"):
        torch.testing.assert_close(sum(p[1][name] for p in parts), whole[1][name])
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), whole[2])
    torch.testing.assert_close(torch.cat([p[3] for p in parts]), whole[3])


def test_masked_garbage_changes_nothing(kernel_backend):
    logp, old, adv, ref, entropy, isw, mask = inputs(3, 16, seed=13)
    clean = [torch.where(mask, x, 0.0) for x in (logp, old, adv, ref, entropy, isw)]
    kw = options("gspo", 0)
    a = run(fastrlhf.policy_loss, logp, entropy, old, adv, mask, ref_logp=ref, rollout_is_weights=isw, **kw)
    b = run(fastrlhf.policy_loss, clean[0], clean[4], *clean[1:3], mask, ref_logp=clean[3],
            rollout_is_weights=clean[5], **kw)
    assert all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))
    assert a[0] == b[0] and all(a[1][k] == b[1][k] for k in a[1])
    assert torch.equal(a[2][~mask], torch.zeros_like(a[2][~mask]))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_packed_equals_padded(kernel_backend, aggregation):
    logp, old, adv, ref, entropy, isw, mask = inputs(3, 12, seed=14)
    lengths = torch.tensor([12, 5, 9])
    mask = mask & (torch.arange(12)[None, :] < lengths[:, None])
    keep = torch.arange(12)[None, :] < lengths[:, None]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    kw = dict(options("ppo", 1), aggregation=aggregation, horizon=12)
    padded = run(fastrlhf.policy_loss, logp, entropy, old, adv, mask, ref_logp=ref, rollout_is_weights=isw, **kw)
    packed = run(fastrlhf.policy_loss, logp[keep], entropy[keep], old[keep], adv[keep], mask[keep],
                 ref_logp=ref[keep], rollout_is_weights=isw[keep], cu_seqlens=cu, **kw)
    torch.testing.assert_close(packed[0], padded[0])
    torch.testing.assert_close(packed[1], padded[1])
    torch.testing.assert_close(packed[2], padded[2][keep])
    want = run(reference.policy_loss, logp[keep], entropy[keep], old[keep], adv[keep], mask[keep],
               ref_logp=ref[keep], rollout_is_weights=isw[keep], cu_seqlens=cu, **kw)
    torch.testing.assert_close(packed[2], want[2])


def test_sequence_advantages(kernel_backend):
    logp, old, _, ref, entropy, isw, mask = inputs(4, 10, seed=15)
    adv = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(1))
    per_token = adv[:, None].expand(4, 10).contiguous()
    for loss_type in ("gspo", "sapo"):
        kw = dict(loss_type=loss_type, aggregation="seq-mean-token-mean")
        a = run(fastrlhf.policy_loss, logp, entropy, old, adv, mask, **kw)
        b = run(fastrlhf.policy_loss, logp, entropy, old, per_token, mask, **kw)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[2], b[2])
        torch.testing.assert_close(a[0], reference.policy_loss(logp, old, adv, mask, **kw)[0])


def test_token_pass_on_slices_adds_up(kernel_backend):
    """policy_loss_tokens on arbitrary chunks, partial sums concatenated, equals the whole call."""
    logp, old, adv, ref, entropy, isw, mask = inputs(5, 13, seed=16)
    flat = [x.reshape(-1) for x in (logp, old, adv, ref, entropy, isw, mask)]
    options = op.make_options("ppo", 0.2, 0.28, 3.0, 1.0, 1.05, 0.1, "k3", 0.01)
    offsets = torch.arange(0, 66, 13)
    plan = op.plan_policy_loss(flat[0], flat[1], flat[6], offsets, 13, options, False,
                               ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"))
    whole = op.policy_loss_tokens(flat[0], flat[1], flat[2], flat[6], flat[3], flat[4], flat[5], plan)
    pieces, grads = [], []
    for start, end in ((0, 7), (7, 30), (30, 65)):
        piece = [x[start:end] for x in flat]
        g_lp, g_ent, partials = op.policy_loss_tokens(piece[0], piece[1], piece[2], piece[6], piece[3], piece[4],
                                                      piece[5], plan, first=start)
        pieces.append(partials)
        grads.append((g_lp, g_ent))
    loss, metrics = op.finish_policy_loss(torch.cat(pieces), options)
    want_loss, want_metrics = op.finish_policy_loss(whole[2], options)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(metrics, want_metrics)
    torch.testing.assert_close(torch.cat([g[0] for g in grads]), whole[0])
    torch.testing.assert_close(torch.cat([g[1] for g in grads]), whole[1])
    ref_loss = reference.policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=3.0, ref_logp=ref, kl_coef=0.1,
                                     entropy=entropy, entropy_coef=0.01, rollout_is_weights=isw,
                                     kl_aggregation="seq-mean-token-sum", entropy_aggregation="seq-mean-token-mean")
    torch.testing.assert_close(loss, ref_loss[0])


def test_opcheck(kernel_backend):
    logp, old, adv, ref, entropy, isw, mask = inputs(3, 11, seed=17)
    flat = [torch.where(mask, x, 0.0).reshape(-1) for x in (logp, old, adv, ref, entropy, isw)]
    options = op.make_options("gspo", 0.2, 0.2, None, 1.0, 1.05, 0.1, "k3+", 0.01)
    plan = op.plan_policy_loss(flat[0], flat[1], mask.reshape(-1), torch.arange(0, 34, 11), 11, options, False,
                               ("seq-mean-token-mean",) * 3)
    args = (flat[0].requires_grad_(), flat[1], flat[2], mask.reshape(-1), flat[3], flat[4].requires_grad_(),
            flat[5], plan.offsets, 11, False, plan.seq_weights, plan.seq_log_ratio, *options)
    torch.library.opcheck(torch.ops.fastrlhf.policy_loss_forward, args)
    data = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.fastrlhf.policy_loss_backward, (torch.tensor(2.0, dtype=F64), *data))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    logp, old, adv, ref, entropy, isw, mask = inputs(3, 16, seed=18, dtype=torch.float32)
    kw = dict(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, num_tokens=mask.sum())

    @torch.compile(fullgraph=True, backend=compiler)
    def step(logp, entropy):
        loss, metrics = fastrlhf.policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=entropy, **kw)
        return loss, metrics["clipfrac"]

    got = run(lambda *a, **k: step(a[0], k["entropy"]), logp, entropy)
    want = run(fastrlhf.policy_loss, logp, entropy, old, adv, mask, ref_logp=ref, **kw)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])


def test_metrics_are_views_of_one_tensor():
    logp, old, adv, _, _, _, mask = inputs(2, 8, seed=19)
    _, metrics = fastrlhf.policy_loss(logp, old, adv, mask)
    bases = {m._base.data_ptr() if m._base is not None else m.data_ptr() for m in metrics.values()}
    assert len(bases) == 1 and not any(m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "ppo2"}, "loss_type"),
    ({"aggregation": "mean"}, "aggregation"),
    ({"kl_aggregation": "sum"}, "kl_aggregation"),
    ({"kl_estimator": "k4", "kl_coef": 0.1}, "kl_estimator"),
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"dual_clip": 3.0, "loss_type": "cispo"}, "dual_clip"),
    ({"clip_low": -0.1}, "clip_low"),
    ({"clip_high": -0.1}, "clip_high"),
    ({"sapo_tau_pos": 0.0}, "sapo_tau_pos"),
    ({"sapo_tau_neg": -1.0}, "sapo_tau_neg"),
    ({"num_tokens": 0}, "num_tokens"),
    ({"num_sequences": torch.tensor(0.0)}, "num_sequences"),
    ({"ref_logp": torch.zeros(2, 5)}, "ref_logp"),
    ({"entropy": torch.zeros(2, 5, dtype=F64)}, "entropy"),
    ({"rollout_is_weights": torch.zeros(2, 6, dtype=torch.float32)}, "rollout_is_weights"),
])
def test_bad_arguments(kwargs, match):
    logp, old, adv, _, _, _, mask = inputs(2, 6, seed=20)
    with pytest.raises((ValueError, TypeError), match=match):
        fastrlhf.policy_loss(logp, old, adv, mask, **kwargs)


def test_bad_tensors():
    logp, old, adv, _, _, _, mask = inputs(2, 6, seed=21)
    with pytest.raises(TypeError, match="old_logp"):
        fastrlhf.policy_loss(logp, old.float(), adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        fastrlhf.policy_loss(logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="mask"):
        fastrlhf.policy_loss(logp, old, adv, mask[:1])
    with pytest.raises(ValueError, match="logp"):
        fastrlhf.policy_loss(logp[0], old[0], adv[0])
    with pytest.raises(ValueError, match="horizon"):
        fastrlhf.policy_loss(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), cu_seqlens=torch.tensor([0, 5, 12]),
                             aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastrlhf.policy_loss(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), cu_seqlens=torch.tensor([0, 5, 11]))


def test_cpp_op_checks_its_inputs():
    logp, old, adv, _, _, _, mask = inputs(2, 6, seed=22)
    flat = [x.reshape(-1) for x in (logp, old, adv)]
    partials = torch.empty(1, len(op.PARTIALS), dtype=F64)
    weights = torch.ones(3, 2, dtype=F64)
    options = op.make_options("ppo", 0.2, 0.2, None, 1.0, 1.0, 0.0, "k1", 0.0)
    cpp = backend.cpp_ops()
    with pytest.raises(RuntimeError, match="first"):
        cpp.policy_loss_tokens(*flat, None, None, None, None, torch.tensor([0, 6, 12]), 6, 3, False, weights, None, None,
                               *options, None, None, partials)
    with pytest.raises(RuntimeError, match="offsets"):
        cpp.policy_loss_tokens(*flat, None, None, None, None, torch.tensor([0, 7, 12]).flip(0), 0, 0, False, weights, None,
                               None, *options, None, None, partials)
    with pytest.raises(RuntimeError, match="old_logp"):
        cpp.policy_loss_tokens(flat[0], flat[1][:5], flat[2], None, None, None, None, torch.tensor([0, 6, 12]), 6,
                               0, False, weights, None, None, *options, None, None, partials)
    with pytest.raises(RuntimeError, match="seq_weights"):
        cpp.policy_loss_tokens(*flat, None, None, None, None, torch.tensor([0, 6, 12]), 0, 0, False, weights[:2], None,
                               None, *options, None, None, partials)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    logp, old, adv, ref, entropy, isw, mask = (x.cuda() for x in inputs(4, 64, seed=23, dtype=torch.float32))
    logp.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = fastrlhf.policy_loss(logp, old, adv, mask, loss_type="gspo", ref_logp=ref, kl_coef=0.1,
                                             rollout_is_weights=isw, aggregation="seq-mean-token-mean",
                                             num_tokens=mask.sum())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = reference.policy_loss(logp.detach().cpu(), old.cpu(), adv.cpu(), mask.cpu(), loss_type="gspo",
                                 ref_logp=ref.cpu(), kl_coef=0.1, rollout_is_weights=isw.cpu(),
                                 aggregation="seq-mean-token-mean")[0]
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-5, atol=1e-6)
