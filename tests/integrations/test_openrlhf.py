"""fastrlhf.integrations.openrlhf: OpenRLHF's own functions give the same results before and after patch().

OpenRLHF's model package imports flash-attn and its experience maker imports vLLM, neither of which
installs on a CPU machine; where they are absent, the import-time names they are asked for are stubbed
(the functions tested here never call them), so OpenRLHF's real code is what runs.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from fastrlhf.integrations import openrlhf as integration

pytest.importorskip("openrlhf", reason="openrlhf is not installed: .ci/install-integrations")
for dependency in ("deepspeed", "peft", "ray", "torchdata", "pylatexenc", "aiohttp"):
    pytest.importorskip(dependency, reason=f"{dependency}, which openrlhf imports, is not installed")


def _noop(*args, **kwargs):
    return None


GPU_ONLY = {
    "flash_attn": {}, "flash_attn.utils": {}, "flash_attn.utils.distributed": {"all_gather": _noop},
    "flash_attn.bert_padding": dict(index_first_axis=_noop, pad_input=_noop, rearrange=_noop, unpad_input=_noop),
    "vllm": {"SamplingParams": dict}, "vllm.inputs": {"TokensPrompt": dict}, "vllm.utils": {"random_uuid": _noop},
}


def stub_absent(monkeypatch, modules: dict[str, dict]) -> None:
    """Empty modules with the given attributes in sys.modules, for packages that are not installed."""
    for name, attributes in modules.items():
        top = sys.modules.get(name.split(".")[0])
        installed = (not getattr(top, "_fastrlhf_stub", False)) if top is not None else (
            importlib.util.find_spec(name.split(".")[0]) is not None)
        if installed:
            continue
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module._fastrlhf_stub = True
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture(scope="module")
def modules():
    """OpenRLHF's modules, imported with the GPU-only packages stubbed; the stubs leave sys.modules after."""
    import transformers  # noqa: F401  (imported before the stubs, so it never sees them)

    with pytest.MonkeyPatch.context() as monkeypatch:
        stub_absent(monkeypatch, GPU_ONLY)
        names = ("models.utils", "models.loss", "models.actor", "trainer.ppo_utils.experience_maker")
        return types.SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(f"openrlhf.{n}") for n in names})


def rollout(B=6, T=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    return rewards, values, torch.arange(T) < lengths[:, None]


def logits_and_labels(seed=1, shape=(3, 17), V=1000):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, V, generator=g), torch.randint(0, V, shape, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_from_logits(modules, matches_original, temperature):
    # the original divides its logits in place: hand it a copy, not the leaf
    call = lambda x, y: modules.utils.log_probs_from_logits(x * 1, y, temperature)  # noqa: E731
    matches_original(call, integration.patch, logits_and_labels())


def test_temperature_scales_the_callers_logits_in_place(modules):
    logits, labels = logits_and_labels(seed=2)
    with integration.patch():
        scaled = logits.clone()
        modules.utils.log_probs_from_logits(scaled, labels, 0.5)
    torch.testing.assert_close(scaled, logits / 0.5)


def test_entropy(modules, matches_original):
    matches_original(lambda x: modules.utils.compute_entropy(x), integration.patch, logits_and_labels(seed=3)[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_match_dtype(modules, dtypes_match, dtype):
    logits, labels = logits_and_labels(seed=6)
    logits = logits.to(dtype)
    dtypes_match(lambda x, y: modules.utils.log_probs_from_logits(x, y), integration.patch, (logits, labels))
    dtypes_match(lambda x: modules.utils.compute_entropy(x), integration.patch, (logits,))


@pytest.mark.parametrize("masked", [True, False])
def test_gae(modules, matches_original, masked):
    maker = modules.experience_maker.RemoteExperienceMaker
    call = lambda r, v, m: maker.get_advantages_and_returns(None, v, r, m if masked else None, 0.99, 0.95)  # noqa: E731
    matches_original(call, integration.patch, rollout(), grads=False)


@pytest.mark.parametrize("loss", ["PairWiseLoss", "LogExpLoss"])
@pytest.mark.parametrize("with_margin", [True, False])
def test_pairwise_losses(modules, matches_original, loss, with_margin):
    g = torch.Generator().manual_seed(4)
    chosen, rejected, margin = (3 * torch.randn(64, generator=g) for _ in range(3))
    module = getattr(modules.loss, loss)()
    if with_margin:
        matches_original(lambda c, r, m: module(c, r, m), integration.patch, (chosen, rejected, margin))
    else:
        matches_original(lambda c, r: module(c, r), integration.patch, (chosen, rejected))


@pytest.mark.parametrize("ipo, label_smoothing", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_dpo_loss(modules, matches_original, ipo, label_smoothing):
    g = torch.Generator().manual_seed(5)
    logps = [-50 * torch.rand(64, generator=g) for _ in range(4)]
    module = modules.loss.DPOLoss(beta=0.1, label_smoothing=label_smoothing, ipo=ipo)
    matches_original(lambda *x: module(*x), integration.patch, logps)


def test_every_holder_is_rebound_and_restored(modules):
    originals = {name: getattr(modules.utils, name) for name in ("log_probs_from_logits", "compute_entropy")}
    gae = modules.experience_maker.RemoteExperienceMaker.get_advantages_and_returns
    with integration.patch():
        for name, original in originals.items():  # actor.py did `from .utils import ...`
            assert getattr(modules.actor, name) is getattr(modules.utils, name) is not original
        assert modules.experience_maker.RemoteExperienceMaker.get_advantages_and_returns is not gae
    for name, original in originals.items():
        assert getattr(modules.actor, name) is getattr(modules.utils, name) is original
    assert modules.experience_maker.RemoteExperienceMaker.get_advantages_and_returns is gae


def test_without_vllm_gae_is_left_alone_with_a_warning(modules, monkeypatch):
    monkeypatch.setitem(sys.modules, integration.EXPERIENCE, None)
    with pytest.warns(UserWarning, match="GAE is not replaced"):
        handle = integration.patch()
    with handle:
        assert not any(target.startswith(integration.EXPERIENCE) for target in handle.replaced)
        assert "log_probs_from_logits" in " ".join(handle.replaced)


def policy_batch(B=5, T=40, seed=7, dtype=torch.float32):
    """log-probs, old log-probs near them (some ratios clipped), per-token advantages, a right-padded bool mask
    with one empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -2 * torch.rand(B, T, generator=g)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    return logp.to(dtype), old.to(dtype), advantages.to(dtype), torch.arange(T) < lengths[:, None]


POLICY_LOSS_COVERED = [
    (dict(), dict()),
    (dict(clip_eps_low=0.1, clip_eps_high=0.28), dict(dp_size=2, batch_num_tokens=150.0)),
    (dict(dual_clip=1.5), dict()),
    (dict(token_level_loss=False), dict()),
    (dict(token_level_loss=False, dual_clip=1.3), dict(dp_size=4, global_batch_size=16)),
    (dict(token_level_loss=False, clip_eps_low=0.05), dict(dp_size=2, global_batch_size=8)),
]


def _policy_loss_call(modules, config, call_options, with_mask=True):
    """PolicyLoss(**config).forward on (logp, old, advantages, mask): the differentiable loss and the two metrics;
    the old log-probs and advantages are data (detached), as fastrlhf treats them."""
    module = modules.loss.PolicyLoss(**config)

    def call(logp, old, advantages, mask):
        out = module(logp, old.detach(), advantages.detach(), mask if with_mask else None, **call_options)
        assert out[3:] == (None, None)
        return out[:3]
    return call


def _counting_policy_loss(monkeypatch):
    """Counts the calls of fastrlhf.policy_loss, so that a covered case cannot pass by falling back."""
    calls = []
    real = integration.fastrlhf.policy_loss
    monkeypatch.setattr(integration.fastrlhf, "policy_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("config, call_options", POLICY_LOSS_COVERED)
def test_policy_loss(modules, matches_original, monkeypatch, config, call_options):
    calls = _counting_policy_loss(monkeypatch)
    matches_original(_policy_loss_call(modules, config, call_options), integration.patch, policy_batch())
    assert calls


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_policy_loss_bf16(modules, matches_original, monkeypatch, token_level_loss):
    calls = _counting_policy_loss(monkeypatch)
    call = _policy_loss_call(modules, dict(token_level_loss=token_level_loss, dual_clip=1.5), {})
    matches_original(call, integration.patch, policy_batch(seed=8, dtype=torch.bfloat16))
    assert calls


def test_policy_loss_without_a_mask(modules, matches_original, monkeypatch):
    calls = _counting_policy_loss(monkeypatch)
    matches_original(_policy_loss_call(modules, {}, {}, with_mask=False), integration.patch, policy_batch())
    assert calls


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_policy_loss_returns_openrlhfs_types(modules, dtype, token_level_loss, mask_dtype):
    logp, old, advantages, mask = policy_batch(dtype=dtype)
    mask = mask.to(mask_dtype)
    module = modules.loss.PolicyLoss(token_level_loss=token_level_loss)
    before = module(logp, old, advantages, mask)
    with integration.patch():
        after = module(logp, old, advantages, mask)
    assert len(after) == len(before) == 5
    assert [None if t is None else (t.dtype, t.shape) for t in after] == [
        None if t is None else (t.dtype, t.shape) for t in before]


POLICY_LOSS_FALLBACKS = [
    dict(policy_loss_type="gspo"),
    dict(policy_loss_type="gspo", dual_clip=3.0),
    dict(is_correction_level="token"),
    dict(is_correction_level="seq", is_correction_mode="mask"),
    dict(clip_eps_low=-0.1),
]


@pytest.mark.parametrize("config", POLICY_LOSS_FALLBACKS)
def test_policy_loss_falls_back(modules, monkeypatch, config):
    logp, old, advantages, mask = policy_batch()
    rollout = old + 0.05
    module = modules.loss.PolicyLoss(**config)
    before = module(logp, old, advantages, mask, rollout)
    monkeypatch.setattr(integration.fastrlhf, "policy_loss", None)  # a covered case would call it and fail
    with integration.patch():
        after = module(logp, old, advantages, mask, rollout)
    for got, want in zip(after, before, strict=True):
        assert (got is want is None) or torch.equal(got, want)


def test_policy_loss_unknown_type_raises_openrlhfs_error(modules):
    module = modules.loss.PolicyLoss(policy_loss_type="cispo")
    with integration.patch(), pytest.raises(ValueError, match="Invalid policy loss type"):
        module(*policy_batch())


def test_policy_loss_forward_is_restored(modules):
    forward = modules.loss.PolicyLoss.forward
    with integration.patch():
        assert modules.loss.PolicyLoss.forward is not forward
    assert modules.loss.PolicyLoss.forward is forward
