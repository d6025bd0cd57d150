"""fastrlhf.integrations.liger: the GRPO drop-in gives what Liger's class gives, and patch() swaps the class.

Each covered configuration is compared, outputs and gradients (hidden states, weight, bias), with Liger's
class in the same precision and with the exact answer: Liger's own per-token loss function
(``LigerFusedLinearGRPOFunction.ppo_loss_fn``, plain torch) run in float64 on float64 log-probs, the project's
rule for comparing with a package (within twice Liger's own error plus a small slack).
"""

import pytest
import torch

from fastrlhf.bench.case import error_and_bound
from fastrlhf.integrations import liger as integration

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed: .ci/install-integrations")
import liger_kernel.chunked_loss  # noqa: E402
from liger_kernel.chunked_loss import grpo_loss  # noqa: E402

LIGER = grpo_loss.LigerFusedLinearGRPOLoss
B, T, H, V = 4, 7, 16, 40
UPSTREAM = 1.3  # the loss's incoming gradient: the backward must scale by it


def batch(seed=0, dtype=torch.float32):
    """hidden, weight, bias, token ids, a right-padded 0/1 int mask with an empty row, per-sequence advantages,
    and old log-probs near the current ones (so that some ratios are clipped)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) / H ** 0.5, torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T) < torch.tensor([T, 3, 0, 5])[:, None]).long()
    advantages = torch.randn(B, generator=g)
    logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + 0.8 * torch.randn(B, T, generator=g)
    return [t.to(dtype) if t.is_floating_point() else t for t in (hidden, weight, bias)] + [ids, mask, advantages, old]


def run(cls, config, data, **forward):
    """``cls(**config)`` on ``data``: loss, metrics, and the gradients of hidden, weight and bias."""
    hidden, weight, bias, ids, mask, advantages, old = data
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = cls(**config)(leaves[0], leaves[1], ids, mask, advantages, bias=leaves[2],
                                  old_per_token_logps=forward.pop("old", old), **forward)
    (loss * UPSTREAM).backward()
    return [loss.detach(), *metrics, *(t.grad for t in leaves)]


def exact(config, data, **forward):
    """Liger's per-token loss function in float64 on float64 log-probs, differentiated by autograd."""
    module = LIGER(**config)
    hidden, weight, bias, ids, mask, advantages, old = data
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = (leaves[0] @ leaves[1].T + leaves[2]) / module.temperature
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    old = forward.get("old", old)
    vllm = forward.get("vllm_is_ratio")
    loss, metrics = grpo_loss.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=logp, attention_mask=mask, advantages=advantages.double(), full_attention_mask=mask,
        old_per_token_logps=None if old is None else old.double(), epsilon_low=module.epsilon_low,
        epsilon_high=module.epsilon_high, beta=module.beta, loss_type=module.loss_type,
        max_completion_length=module.max_completion_length,
        importance_sampling_level=module.importance_sampling_level,
        sapo_temperature_pos=module.sapo_temperature_pos, sapo_temperature_neg=module.sapo_temperature_neg,
        vllm_is_ratio=None if vllm is None else vllm.double().reshape(B, -1), delta=module.delta,
        num_items_in_batch=forward.get("num_items_in_batch"))
    grads = torch.autograd.grad(loss * UPSTREAM, leaves)
    return [loss.detach(), *metrics, *grads]


COVERED = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=10),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=2.0),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
    "grpo-sequence": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "dapo-sequence": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_low=0.15),
    "bnpo-sequence": dict(loss_type="bnpo", importance_sampling_level="sequence"),
    "dr_grpo-sequence": dict(loss_type="dr_grpo", importance_sampling_level="sequence", max_completion_length=9),
    "dapo-delta": dict(loss_type="dapo", delta=1.5, epsilon_high=0.28),
    "grpo-delta": dict(loss_type="grpo", delta=1.2),
    "beta-without-reference": dict(loss_type="bnpo", beta=0.04),
    "temperature": dict(loss_type="grpo", temperature=0.7),
}
FORWARD = {
    "no old log-probs": dict(old=None),
    "num_items_in_batch": dict(num_items_in_batch=37),
    "num_items_in_batch tensor": dict(num_items_in_batch=torch.tensor(29)),
    "vllm_is_ratio [B, T]": dict(vllm_is_ratio=0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(3))),
    "vllm_is_ratio [B]": dict(vllm_is_ratio=torch.tensor([0.9, 1.2, 1.0, 0.7])),
}


def _config(config):
    # compiled=False: torch.compile of Liger's loss maths takes minutes on a CPU and changes nothing here
    return dict(beta=0.0, use_ref_model=False, compiled=False) | config


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of fastrlhf.linear_policy_loss, so that a covered case cannot pass by falling back."""
    calls = []
    real = integration.fastrlhf.linear_policy_loss
    monkeypatch.setattr(integration.fastrlhf, "linear_policy_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def assert_equals_liger(config, data, **forward):
    config = _config(config)
    want = exact(config, data, **forward)
    same = run(LIGER, config, data, **forward)
    got = run(integration.FusedLinearGRPOLoss, config, data, **forward)
    assert len(got) == len(same) == len(want)
    assert [t.dtype for t in got] == [t.dtype for t in same]
    for i, (g, w, s) in enumerate(zip(got, want, same)):
        assert g.shape == w.shape, i
        error, bound = error_and_bound(g, w, s)
        assert error <= bound, f"output/gradient {i}: error {error:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("name", COVERED)
def test_covered_loss_types(fused_calls, name):
    assert_equals_liger(COVERED[name], batch(seed=len(name)))
    assert fused_calls


@pytest.mark.parametrize("forward", FORWARD)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_covered_forward_arguments(fused_calls, forward, loss_type):
    config = dict(loss_type=loss_type) | (dict(epsilon_high=3.0) if loss_type == "cispo" else {})
    assert_equals_liger(config, batch(seed=5), **FORWARD[forward])
    assert fused_calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(fused_calls, dtype):
    assert_equals_liger(COVERED["grpo"], batch(seed=11, dtype=dtype))
    assert fused_calls


FALLBACKS = {
    "beta with a reference": (dict(beta=0.04, use_ref_model=True), True),
    "luspo": (dict(loss_type="luspo"), False),
    "vespo": (dict(loss_type="vespo"), False),
    "delta below 1 + epsilon_high": (dict(delta=1.1), False),
    "delta, sequence level": (dict(delta=2.0, importance_sampling_level="sequence"), False),
    "cispo with epsilon_high < 1": (dict(loss_type="cispo", epsilon_high=0.2), False),
    "negative epsilon": (dict(epsilon_low=-0.1), False),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_falls_back_to_liger(monkeypatch, name):
    config, with_reference = FALLBACKS[name]
    data = batch(seed=2)
    forward = dict(ref_per_token_logps=data[-1] - 0.1) if with_reference else {}
    want = run(LIGER, _config(config), data, **forward)
    monkeypatch.setattr(integration.fastrlhf, "linear_policy_loss", None)  # a covered case would call it and fail
    got = run(integration.FusedLinearGRPOLoss, _config(config), data, **forward)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_weight_in_another_dtype_falls_back(monkeypatch):
    hidden, weight, bias, *rest = batch(seed=4)
    data = [hidden, weight.bfloat16(), bias.bfloat16(), *rest]
    want = run(LIGER, _config({}), data)
    monkeypatch.setattr(integration.fastrlhf, "linear_policy_loss", None)
    for g, w in zip(run(integration.FusedLinearGRPOLoss, _config({}), data), want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("config", [dict(use_ref_model=True), dict(loss_type="sapo", importance_sampling_level="sequence")])
def test_liger_errors_are_raised(config):
    with pytest.raises((AssertionError, ValueError)):
        run(integration.FusedLinearGRPOLoss, _config(config), batch())


@pytest.mark.parametrize("match_dtype", [False, True])
def test_patch_swaps_the_class_and_unpatch_restores_it(fused_calls, match_dtype):
    with integration.patch(match_dtype=match_dtype) as handle:
        assert grpo_loss.LigerFusedLinearGRPOLoss is integration.FusedLinearGRPOLoss
        assert liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss is integration.FusedLinearGRPOLoss
        built = liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(**_config({}))
        assert isinstance(built, LIGER)
        loss, (clipped,) = built(*(t for t in batch()[:2]), *batch()[3:6], old_per_token_logps=batch()[-1])
        assert loss.dtype == clipped.dtype == torch.float32 and fused_calls
    assert "undone" in repr(handle)
    assert grpo_loss.LigerFusedLinearGRPOLoss is LIGER
    assert liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss is LIGER
