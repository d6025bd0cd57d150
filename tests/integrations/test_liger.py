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


def _logprobs(hidden, weight, bias, ids, temperature):
    logits = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]


def exact(config, data, **forward):
    """Liger's per-token loss function in float64 on float64 log-probs, differentiated by autograd."""
    module = LIGER(**config)
    hidden, weight, bias, ids, mask, advantages, old = data
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logp = _logprobs(*leaves, ids, module.temperature)
    old = forward.get("old", old)
    ref = forward.get("ref_per_token_logps")
    if ref is None and forward.get("ref_input") is not None:
        head = (forward[k].double() for k in ("ref_input", "ref_weight", "ref_bias"))
        ref = _logprobs(*head, ids, module.temperature)
    vllm = forward.get("vllm_is_ratio")
    loss, metrics = grpo_loss.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=logp, attention_mask=mask, advantages=advantages.double(), full_attention_mask=mask,
        ref_per_token_logps=None if ref is None or not module.use_ref_model else ref.double(),
        old_per_token_logps=None if old is None else old.double(),
        vllm_is_ratio=None if vllm is None else vllm.double().reshape(B, -1),
        num_items_in_batch=forward.get("num_items_in_batch"), **{name: getattr(module, name) for name in (
            "epsilon_low", "epsilon_high", "beta", "loss_type", "max_completion_length", "importance_sampling_level",
            "sapo_temperature_pos", "sapo_temperature_neg", "delta", "use_bias_correction_kl", "vespo_k_pos",
            "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")})
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


def reference_head(seed=9):
    """A reference model's last hidden states and head, near the policy's of ``batch(0)``."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight, bias = batch()[:3]
    return dict(ref_input=hidden + 0.3 * torch.randn(hidden.shape, generator=g),
                ref_weight=weight + 0.05 * torch.randn(weight.shape, generator=g), ref_bias=bias)


# Liger's per-token loss on fastrlhf's log-probs: options linear_policy_loss does not reproduce
ON_LOGPROBS = {
    "beta, reference log-probs": (dict(loss_type="dapo", beta=0.04, use_ref_model=True),
                                  dict(ref_per_token_logps=batch()[-1] - 1.5)),
    "beta, reference head": (dict(loss_type="grpo", beta=0.1, use_ref_model=True), reference_head()),
    "beta, bias-corrected KL, sequence": (dict(loss_type="bnpo", beta=0.04, use_ref_model=True,
                                               use_bias_correction_kl=True, importance_sampling_level="sequence"),
                                          dict(ref_per_token_logps=batch()[-1] - 0.5)),
    "luspo": (dict(loss_type="luspo"), {}),
    "vespo": (dict(loss_type="vespo", vespo_k_pos=1.5), dict(vllm_is_ratio=torch.tensor([0.9, 1.2, 1.0, 0.7]))),
    "delta below 1 + epsilon_high": (dict(delta=1.1), {}),
    "delta, sequence level": (dict(delta=1.05, importance_sampling_level="sequence", epsilon_low=0.01,
                                   epsilon_high=0.01), {}),
    "cispo with epsilon_high < 1": (dict(loss_type="cispo", epsilon_high=0.9), {}),
    "negative epsilon": (dict(epsilon_low=-0.1), {}),
}


@pytest.mark.parametrize("name", ON_LOGPROBS)
def test_other_options_on_fastrlhf_logprobs(monkeypatch, name):
    config, forward = ON_LOGPROBS[name]
    calls = []
    real = integration.fastrlhf.linear_logprobs
    monkeypatch.setattr(integration.fastrlhf, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(integration.fastrlhf, "linear_policy_loss", None)
    assert_equals_liger(config, batch(), **forward)
    assert len(calls) == 1 + ("ref_input" in forward)


def test_weights_in_another_dtype_fall_back(monkeypatch):
    hidden, weight, bias, *rest = batch(seed=4)
    data = [hidden, weight.bfloat16(), bias.bfloat16(), *rest]
    reference = reference_head() | dict(ref_weight=reference_head()["ref_weight"].double())
    for config, forward in ((dict(), {}), (dict(beta=0.04, use_ref_model=True), reference)):
        want = run(LIGER, _config(config), data, **forward)
        monkeypatch.setattr(integration.fastrlhf, "linear_policy_loss", None)
        monkeypatch.setattr(integration.fastrlhf, "linear_logprobs", None)
        for g, w in zip(run(integration.FusedLinearGRPOLoss, _config(config), data, **forward), want, strict=True):
            assert torch.equal(g, w)
        monkeypatch.undo()


@pytest.mark.parametrize("config, forward, error", [
    (dict(use_ref_model=True), {}, AssertionError),
    (dict(loss_type="dr_grpo"), {}, AssertionError),
    (dict(loss_type="sapo", importance_sampling_level="sequence"), {}, ValueError),
    (dict(importance_sampling_level="batch"), {}, ValueError),
    (dict(loss_type="ppo"), {}, ValueError),
    (dict(), dict(vllm_is_ratio=torch.ones(B, 2)), AssertionError),
])
def test_liger_errors_are_raised(config, forward, error):
    """Configurations Liger refuses go to its class, which raises its own error."""
    with pytest.raises(error):
        run(LIGER, _config(config), batch(), **forward)
    with pytest.raises(error):
        run(integration.FusedLinearGRPOLoss, _config(config), batch(), **forward)


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
