"""fastrlhf.linear_policy_loss against policy_loss(linear_logprobs(...)) and the float64 reference."""

from unittest import mock

import pytest
import torch

import fastrlhf
from fastrlhf import backend, reference
from fastrlhf.ops.policy_loss import AGGREGATIONS, LOSS_TYPES

F64 = torch.float64
IGNORE = -100


def inputs(B, T, H, V, seed=0, bias=True):
    """float64 hidden states, lm_head and per-token data of realistic scale; a few ignored labels, one fully
    masked sequence, and old log-probs near the current ones (ratios around 1, some clipped)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * (3.0 / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=F64) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -2:] = IGNORE
    labels[-1] = IGNORE
    with torch.no_grad():
        logp = reference.linear_logprobs(hidden, weight, labels, bias=b)
    old_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    advantages = torch.randn(B, T, generator=g, dtype=F64)
    is_weights = torch.rand(B, T, generator=g, dtype=F64) + 0.5
    return hidden, weight, b, labels, old_logp, advantages, ref_logp, is_weights


OPTIONS = dict(kl_coef=0.1, entropy_coef=0.01, kl_estimator="k3")


def run(fn, hidden, weight, bias, labels, old_logp, advantages, dtype=F64, **kw):
    """(loss, metrics, grads of hidden, weight[, bias]) of ``fn`` on leaves cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss, metrics = fn(leaves[0], leaves[1], labels, old_logp, advantages, bias=leaves[2] if bias is not None
                       else None, **kw)
    return loss.detach(), metrics, torch.autograd.grad(loss, leaves)


def assert_same(got, want, rtol=1e-10, atol=1e-12):
    (loss, metrics, grads), (loss_w, metrics_w, grads_w) = got, want
    torch.testing.assert_close(loss.double(), loss_w.double(), rtol=rtol, atol=atol)
    for name in metrics_w:
        torch.testing.assert_close(metrics[name].double(), metrics_w[name].double(), rtol=max(rtol, 1e-6),
                                   atol=max(atol, 1e-6), msg=lambda m: f"{name}: {m}")
    for k, (x, y) in enumerate(zip(grads, grads_w)):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_every_loss_type_and_aggregation_matches_float64_reference(loss_type, aggregation):
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(3, 6, 8, 37, seed=LOSS_TYPES.index(loss_type))
    kw = dict(loss_type=loss_type, aggregation=aggregation, ref_logp=ref, rollout_is_weights=isw, chunk_size=5,
              dual_clip=3.0 if loss_type == "ppo" else None, **OPTIONS)
    with backend.use_backend("cpp"):
        got = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old, adv, **kw)
    assert_same(got, run(reference.linear_policy_loss, hidden, weight, bias, labels, old, adv, **kw))


def test_triton_kernels_match_float64_reference():
    pytest.importorskip("triton")
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(2, 5, 8, 29, seed=11)
    kw = dict(ref_logp=ref, rollout_is_weights=isw, chunk_size=4, aggregation="seq-mean-token-mean", **OPTIONS)
    with backend.use_backend("triton"):
        got = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old, adv, **kw)
    assert_same(got, run(reference.linear_policy_loss, hidden, weight, bias, labels, old, adv, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_the_unfused_op(dtype):
    """Same result as policy_loss(linear_logprobs(...)) on the same rounded inputs: the logits in the input
    dtype, the loss maths in fp32, the weight's gradient accumulated in fp32 before its one rounding."""
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(4, 16, 32, 300, seed=5)
    hidden, weight, bias = (t.to(dtype) for t in (hidden, weight, bias))
    kw = dict(ref_logp=ref.float(), **OPTIONS)

    def unfused(h, w, lab, old_logp, advantages, *, bias, **options):
        logp, entropy = fastrlhf.linear_logprobs(h, w, lab, bias=bias, return_entropy=True)
        return fastrlhf.policy_loss(logp, old_logp, advantages, lab != IGNORE, entropy=entropy, **options)

    got = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old.float(), adv.float(), dtype, **kw)
    want = run(unfused, hidden, weight, bias, labels, old.float(), adv.float(), dtype, **kw)
    tol = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-3)}[dtype]
    assert_same(got, want, *tol)


def test_chunking_gspo_per_sequence_advantages_and_return_logp():
    """Any chunk size (not dividing the tokens, cutting sequences) gives the same loss, metrics, gradients
    and log-probs; gspo's two passes and [B] advantages included."""
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(3, 7, 8, 41, seed=7)
    kw = dict(loss_type="gspo", aggregation="seq-mean-token-mean", **OPTIONS)
    runs = []
    for chunk in (1, 4, 21, None):
        with backend.use_backend("cpp"):
            runs.append(run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old, adv[:, 0],
                            chunk_size=chunk, **kw))
    want = run(reference.linear_policy_loss, hidden, weight, bias, labels, old, adv[:, 0], **kw)
    for got in runs:
        assert_same(got, want)
    with torch.no_grad():
        _, _, logp = fastrlhf.linear_policy_loss(hidden, weight, labels, old, adv, bias=bias, return_logp=True)
    torch.testing.assert_close(logp, reference.linear_logprobs(hidden, weight, labels, bias=bias), rtol=0, atol=1e-12)


def test_masked_and_ignored_tokens_are_never_read():
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(3, 6, 8, 37, seed=8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 1] = False
    want = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old, adv, mask=mask, ref_logp=ref, **OPTIONS)
    hole = ~mask | (labels == IGNORE)
    poisoned = [t.masked_fill(hole, float("nan")) for t in (old, adv, ref)]
    got = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, poisoned[0], poisoned[1], mask=mask,
              ref_logp=poisoned[2], **OPTIONS)
    assert_same(got, want, rtol=0, atol=0)


def test_tied_weights_and_no_bias():
    """The lm_head tied to the input embedding: both uses' gradients add up, as in the reference."""
    g = torch.Generator().manual_seed(9)
    embedding = (torch.randn(40, 8, generator=g, dtype=F64) * 0.5).requires_grad_()
    ids = torch.randint(0, 40, (2, 5), generator=g)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    old, adv = torch.randn(2, 5, generator=g, dtype=F64) - 4, torch.randn(2, 5, generator=g, dtype=F64)
    grads = []
    for fn in (fastrlhf.linear_policy_loss, reference.linear_policy_loss):
        hidden = torch.tanh(embedding[ids])
        loss, _ = fn(hidden, embedding, labels, old, adv, chunk_size=3)
        grads.append(torch.autograd.grad(loss, embedding)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_with_global_counts_add_up_to_one_batch(aggregation):
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(8, 5, 8, 31, seed=10)
    scored = labels != IGNORE
    counts = dict(num_tokens=scored.sum(), num_sequences=scored.any(-1).sum())
    kw = dict(aggregation=aggregation, ref_logp=ref, loss_type="ppo", **counts, **OPTIONS)
    whole = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old, adv, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    total = 0
    for rows in torch.arange(8).chunk(4):
        loss, _ = fastrlhf.linear_policy_loss(leaves[0][rows], leaves[1], labels[rows], old[rows], adv[rows],
                                              bias=leaves[2], **{**kw, "ref_logp": ref[rows]})
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole[0], rtol=1e-12, atol=1e-12)
    for leaf, grad in zip(leaves, whole[2]):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-10, atol=1e-12)


def test_packed_equals_padded():
    hidden, weight, bias, labels, old, adv, ref, isw = inputs(3, 6, 8, 37, seed=12)
    lengths = [6, 4, 2]
    keep = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    cu = torch.tensor([0, 6, 10, 12])
    kw = dict(aggregation="seq-mean-token-mean", **OPTIONS)
    padded = run(fastrlhf.linear_policy_loss, hidden, weight, bias, labels, old, adv, mask=keep, ref_logp=ref, **kw)
    packed = run(fastrlhf.linear_policy_loss, hidden[keep], weight, bias, labels[keep], old[keep], adv[keep],
                 ref_logp=ref[keep], cu_seqlens=cu, **kw)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed[2][1], padded[2][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(packed[2][0], padded[2][0][keep], rtol=1e-10, atol=1e-12)


def test_no_gradient_work_without_gradients(monkeypatch):
    """Under no_grad (scoring the next step's old_logp) the log-prob backward and the gradient GEMMs never run."""
    import fastrlhf.ops.linear_policy_loss as op

    hidden, weight, bias, labels, old, adv, *_ = inputs(2, 5, 8, 29, seed=13)
    calls = []
    monkeypatch.setattr(op, "backward_into", lambda *a: calls.append(a))
    with torch.no_grad():
        loss, metrics, logp = fastrlhf.linear_policy_loss(hidden, weight, labels, old, adv, bias=bias,
                                                          return_logp=True)
    assert not calls and logp.shape == labels.shape
    want, _ = reference.linear_policy_loss(hidden, weight, labels, old, adv, bias=bias)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_repeated_backward_and_double_backward():
    """The saved gradients are scaled in place; a second backward through the same graph with another incoming
    gradient still gives that gradient's result; create_graph=True raises."""
    hidden, weight, bias, labels, old, adv, *_ = inputs(2, 4, 8, 29, seed=14)
    h = hidden.requires_grad_()
    loss, _ = fastrlhf.linear_policy_loss(h, weight, labels, old, adv)
    first = torch.autograd.grad(loss, h, torch.tensor(2.0, dtype=F64), retain_graph=True)[0]
    second = torch.autograd.grad(loss, h, torch.tensor(-0.5, dtype=F64), retain_graph=True)[0]
    torch.testing.assert_close(second, first * -0.25, rtol=1e-14, atol=0)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_gradcheck_float64():
    hidden, weight, bias, labels, old, adv, ref, _ = inputs(2, 3, 4, 11, seed=15)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]

    def loss(h, w, b):
        return fastrlhf.linear_policy_loss(h, w, labels, old, adv, bias=b, ref_logp=ref, chunk_size=2, **OPTIONS)[0]

    assert torch.autograd.gradcheck(loss, leaves)


def test_opcheck_and_compile():
    hidden, weight, bias, labels, old, adv, ref, _ = inputs(2, 4, 8, 29, seed=16)
    real = torch.ops.fastrlhf.linear_policy_loss_forward
    with mock.patch.object(torch.ops.fastrlhf, "linear_policy_loss_forward", wraps=real) as spy:
        fastrlhf.linear_policy_loss(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels, old,
                                    adv, bias=bias, ref_logp=ref, **OPTIONS)
    torch.library.opcheck(real, spy.call_args.args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def step(h, w, b):
        loss, metrics = fastrlhf.linear_policy_loss(h, w, labels, old, adv, bias=b, ref_logp=ref, **OPTIONS)
        return loss, metrics["clipfrac"]

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, clipfrac = torch.compile(step, fullgraph=True)(*leaves)
    want = run(reference.linear_policy_loss, hidden.detach(), weight.detach(), bias, labels, old, adv, ref_logp=ref,
               **OPTIONS)
    torch.testing.assert_close(loss, want[0], rtol=1e-10, atol=1e-12)
    for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves)):
        assert leaf.shape == grad.shape


@pytest.mark.parametrize(("change", "error"), [
    (dict(weight=torch.zeros(5, 7, dtype=F64)), "weight: expected shape"),
    (dict(old_logp=torch.zeros(2, 4, dtype=torch.int64)), "old_logp: expected dtype"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), "mask: expected shape"),
    (dict(advantages=torch.zeros(3, dtype=F64)), "advantages: expected shape"),
    (dict(loss_type="grpo"), "loss_type: expected one of"),
])
def test_bad_input_names_the_argument(change, error):
    hidden, weight, bias, labels, old, adv, *_ = inputs(2, 4, 8, 29, seed=17)
    args = {**dict(hidden=hidden, weight=weight, labels=labels, old_logp=old, advantages=adv), **change}
    with pytest.raises((ValueError, TypeError), match=error):
        fastrlhf.linear_policy_loss(**args)
