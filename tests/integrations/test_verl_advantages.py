"""fastrlhf.integrations.verl, advantage estimators: verl's registered estimators give the same advantages
before and after patch(), singletons included, and run verl's own code where fastrlhf does not cover the call."""

import numpy as np
import pytest
import torch

from fastrlhf.integrations import verl as integration

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (with ray, tensordict, omegaconf, "
                                 "hydra-core, codetiming) is not installed: .ci/install-integrations")

ESTIMATORS = ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo")
NORMALISED = ("grpo", "grpo_vectorized")  # the ones with norm_adv_by_std_in_grpo


def rollout(B=14, T=30, seed=0):
    """Token rewards everywhere (verl's score sums every token, masked or not) and an int64 response mask
    with right padding and holes."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    return rewards, mask.long()


def uids(B=14, seed=0, kind="str"):
    """Shuffled group labels: groups of 4, 3, 2 and singletons."""
    sizes = [4, 3, 2, 1, 1, 2, 1]
    labels = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)[:B]
    labels = np.random.default_rng(seed).permutation(labels)
    return np.array([f"uid-{x}" for x in labels], dtype=object) if kind == "str" else labels


def estimate(name, index, **options):
    """The estimator as a function of (rewards, mask), looked up in verl's registry at call time."""
    def call(rewards, mask):
        return core_algos.get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=index,
                                                     **options)
    return call


def assert_same_advantages(matches_original, call, rewards, mask):
    matches_original(lambda r, m: call(r, m)[0], integration.patch, (rewards, mask), grads=False)
    for dtype in (torch.float32, torch.float64):
        before = call(rewards.to(dtype), mask)
        with integration.patch():
            after = call(rewards.to(dtype), mask)
        assert after[0] is after[1]
        assert after[0].dtype == before[0].dtype == dtype
        assert torch.equal(after[0] == 0, before[0] == 0)  # masked tokens (and zero advantages) are exact zeros


@pytest.mark.parametrize("kind", ["str", "int"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimators_match_verl(matches_original, name, kind):
    rewards, mask = rollout()
    assert_same_advantages(matches_original, estimate(name, uids(kind=kind)), rewards, mask)


@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("name", NORMALISED)
def test_grpo_options(matches_original, name, norm, epsilon):
    rewards, mask = rollout(seed=1)
    call = estimate(name, uids(seed=1), epsilon=epsilon, norm_adv_by_std_in_grpo=norm)
    assert_same_advantages(matches_original, call, rewards, mask)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_group_a_singleton(matches_original, name):
    """Each estimator's own rule: grpo mean 0 std 1, rloo the raw score, rloo_vectorized 0, ..."""
    rewards, mask = rollout(B=6, seed=2)
    assert_same_advantages(matches_original, estimate(name, np.arange(6) * 5), rewards, mask)


@pytest.mark.parametrize("name", ["rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo"])
def test_epsilon_unused_outside_grpo(matches_original, name):
    """verl reads epsilon only in GRPO: any value (None included) is accepted elsewhere."""
    rewards, mask = rollout(seed=5)
    assert_same_advantages(matches_original, estimate(name, uids(seed=5), epsilon=None), rewards, mask)


def test_opo_weights_by_length_and_counts_rewards_outside_the_mask(matches_original):
    rewards, mask = rollout(B=8, seed=3)
    mask[1] = 0  # an empty response: no weight, no score
    rewards[:, -1] = 10.0  # beyond most responses' masks: still in verl's score
    assert_same_advantages(matches_original, estimate("opo", uids(B=8, seed=3)), rewards, mask)


@pytest.mark.parametrize("name, index, rewards_dtype, mask_dtype", [
    ("grpo", torch.tensor([0, 0, 1, 1, 2, 2]), torch.float32, torch.int64),  # verl keys a dict by tensor identity
    ("rloo", np.array([0, 0, 1, 1, 2, np.nan]), torch.float32, torch.int64),  # NaN labels never compare equal
    ("opo", np.array([0, 0, 1, 1, 2, 2]), torch.float32, torch.float32),  # float masks weigh tokens
    ("grpo_vectorized", np.array([0, 0, 1, 1, 2, 2]), torch.bfloat16, torch.int64),  # verl's own dtype rules
    ("rloo_vectorized", np.array([0, 0, 1, 1, 2]), torch.float32, torch.int64),  # wrong length: verl's error
])
def test_fallback_runs_verls_function(name, index, rewards_dtype, mask_dtype):
    rewards, mask = rollout(B=6, seed=4)
    rewards, mask = rewards.to(rewards_dtype), mask.to(mask_dtype) * (0.5 if mask_dtype.is_floating_point else 1)

    def run():
        try:
            return estimate(name, index)(rewards, mask)[0]
        except Exception as err:  # noqa: BLE001 - the error itself is what is compared
            return type(err), str(err)

    before = run()
    with integration.patch():
        after = run()
    assert after == before if isinstance(before, tuple) else torch.equal(after, before)


def test_registry_returns_replacements_and_unpatch_restores():
    originals = {name: core_algos.get_adv_estimator_fn(name) for name in ESTIMATORS}
    with integration.patch():
        for name, original in originals.items():
            replaced = core_algos.get_adv_estimator_fn(name)
            assert replaced is not original and replaced.__name__ == original.__name__
            assert getattr(core_algos, original.__name__) is replaced
        assert core_algos.get_adv_estimator_fn("remax") is core_algos.compute_remax_outcome_advantage  # not replaced
    assert {name: core_algos.get_adv_estimator_fn(name) for name in ESTIMATORS} == originals
    assert all(getattr(core_algos, f.__name__) is f for f in originals.values())
