"""fastrlhf.integrations.verl: verl's own functions give the same results before and after patch()."""

import pytest
import torch

from fastrlhf.integrations import verl as integration

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (with ray, tensordict, omegaconf, "
                                 "hydra-core, codetiming) is not installed: .ci/install-integrations")
verl_F = pytest.importorskip("verl.utils.torch_functional")


def rollout(B=6, T=70, seed=0):
    """Rewards, values and a response mask with right padding and masked observation tokens inside."""
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.2)
    return rewards, values, mask.long()


def logits_and_labels(dtype, shape=(3, 17), V=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, V, generator=g)).to(dtype)
    return logits, torch.randint(0, V, shape, generator=g)


def test_gae_with_whitening(matches_original):
    call = lambda r, v, m: core_algos.compute_gae_advantage_return(r, v, m, 0.99, 0.95)  # noqa: E731
    matches_original(call, integration.patch, rollout(), grads=False)


def test_gae_per_row_coefficients(matches_original):
    rewards, values, mask = rollout(seed=3)
    gamma = torch.rand(6, generator=torch.Generator().manual_seed(4))
    call = lambda r, v, m: core_algos.compute_gae_advantage_return(r, v, m, gamma, 0.9)  # noqa: E731
    matches_original(call, integration.patch, (rewards, values, mask), grads=False)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(matches_original, shift_mean):
    values, _, mask = rollout(seed=5)
    matches_original(lambda x, m: verl_F.masked_whiten(x, m, shift_mean), integration.patch, (values, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_logprobs_and_entropy(matches_original, dtype):
    logits, labels = logits_and_labels(dtype)
    matches_original(lambda x, y: verl_F.logprobs_from_logits(x, y, inplace_backward=False), integration.patch,
                     (logits, labels))
    matches_original(lambda x: verl_F.entropy_from_logits(x), integration.patch, (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_match_dtype(dtypes_match, dtype):
    logits, labels = logits_and_labels(dtype, seed=6)
    dtypes_match(lambda x, y: verl_F.logprobs_from_logits(x, y, inplace_backward=False), integration.patch,
                 (logits, labels))
    dtypes_match(lambda x: verl_F.entropy_from_logits(x), integration.patch, (logits,))


def test_match_dtype_follows_verls_flash_attention_path(monkeypatch):
    """With flash-attention's cross-entropy, verl's log-probs are fp32 whatever the logits' dtype."""
    logits, labels = logits_and_labels(torch.bfloat16, seed=7)
    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    with integration.patch(match_dtype=True):
        assert verl_F.logprobs_from_logits(logits, labels).dtype == torch.float32
        assert verl_F.entropy_from_logits(logits).dtype == torch.bfloat16
        monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
        assert verl_F.logprobs_from_logits(logits, labels).dtype == torch.bfloat16


def test_inplace_backward_gives_the_same_gradient():
    logits, labels = logits_and_labels(torch.float32)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        with integration.patch():
            verl_F.logprobs_from_logits(leaf * 1, labels, inplace_backward=inplace).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_every_holder_is_rebound_and_restored():
    from verl.workers.rollout.naive import naive_rollout  # did `from verl.utils.torch_functional import ...`

    originals = {name: getattr(verl_F, name) for name in ("logprobs_from_logits", "entropy_from_logits",
                                                          "masked_whiten")}
    gae = core_algos.compute_gae_advantage_return
    with integration.patch() as handle:
        replaced = verl_F.logprobs_from_logits
        assert naive_rollout.logprobs_from_logits is replaced is not originals["logprobs_from_logits"]
        assert core_algos.get_adv_estimator_fn("gae") is core_algos.compute_gae_advantage_return is not gae
        assert core_algos.compute_gae_advantage_return.__name__ == "compute_gae_advantage_return"
        assert len(handle.replaced) == 4 + 5 + 6 + 1  # helpers, policy losses, advantage estimators
    assert naive_rollout.logprobs_from_logits is originals["logprobs_from_logits"]
    assert core_algos.get_adv_estimator_fn("gae") is core_algos.compute_gae_advantage_return is gae
    assert all(getattr(verl_F, name) is original for name, original in originals.items())

