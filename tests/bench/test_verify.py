"""``fastrlhf verify``: its table, its exit code, and that a wrong kernel fails it."""

import pytest
import torch

import fastrlhf
from fastrlhf import backend
from fastrlhf.bench import logprobs as logprobs_bench
from fastrlhf.bench import policy_loss as policy_loss_bench
from fastrlhf.bench import verify
from fastrlhf.bench.case import bound, within


def test_gae_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("gae",))
    assert ok and table.row_count >= 36


def test_logprobs_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("logprobs",))
    assert ok and table.row_count >= 4 * 3 * 3  # shapes x dtypes x (logp, entropy, gradient) per backend


def test_bound_is_k_roundings_of_the_scale_plus_half_an_ulp_of_the_stored_dtype():
    exact = torch.tensor([1.0, -3.0, 0.0], dtype=torch.float64)
    eps32, eps16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    allowed = bound(exact, torch.tensor([2.0, 5.0, 1.0]), torch.float32, torch.bfloat16, k=4)
    tiny = torch.finfo(torch.bfloat16).tiny * eps16
    assert torch.allclose(allowed, torch.tensor([8 * eps32 + eps16 / 2, 20 * eps32 + 1.5 * eps16, 4 * eps32 + tiny / 2],
                                                dtype=torch.float64))


def test_within_reports_the_element_nearest_its_bound_and_rejects_wrong_infinities():
    exact = torch.tensor([1.0, 2.0, float("-inf")], dtype=torch.float64)
    allowed = torch.tensor([1e-3, 1e-6, 1.0], dtype=torch.float64)
    assert within(torch.tensor([1.0005, 2.0, float("-inf")]), exact, allowed) == pytest.approx((5e-4, 1e-3), rel=1e-3)
    error, limit = within(torch.tensor([1.0, 2.00001, float("-inf")]), exact, allowed)
    assert error > limit
    assert within(torch.tensor([1.0, 2.0, 0.0]), exact, allowed) == (float("inf"), 0.0)
    assert within(torch.tensor([1.0, float("nan"), float("-inf")]), exact, allowed) == (float("inf"), 0.0)


def test_a_bf16_logprobs_error_far_below_torch_bf16_but_above_fp32_rounding_fails(monkeypatch):
    # The old rule allowed twice a pure-bf16 log_softmax's error (0.15); 1e-4 on an fp32 log-prob is
    # hundreds of fp32 roundings of its magnitudes, so it must fail.
    original = fastrlhf.logprobs

    def off(*args, **kwargs):
        logp, entropy = original(*args, **kwargs)
        return logp + 1e-4, entropy

    monkeypatch.setattr(fastrlhf, "logprobs", off)
    check = next(c for c in logprobs_bench.checks() if c.dtype == torch.bfloat16 and c.shape == "N=33 V=1000")
    with backend.use_backend("cpp"):
        error, limit = check.run(torch.device("cpu"))["logp"]
    assert error > limit


def test_linear_logprobs_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("linear_logprobs",))
    assert ok and table.row_count >= 45


def test_pairwise_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("pairwise",))
    assert ok and table.row_count >= 3 * (4 * 5 + 4 + 4)  # dtypes x (dpo 4 types x 5, sigmoid 4, reward model 4)


def test_policy_loss_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("policy_loss",))
    assert ok and table.row_count >= 3 * 3 * 3  # shapes x dtypes x (loss, two gradients)


def test_a_policy_loss_that_drops_one_token_fails(monkeypatch):
    # One token of 400 left out of the loss and its gradient: the per-token gradient bound must catch it.
    original = fastrlhf.policy_loss

    def dropped(logp, old, adv, mask, **kwargs):
        mask = mask.clone()
        mask[0, 0] = False
        return original(logp, old, adv, mask, **kwargs)

    monkeypatch.setattr(fastrlhf, "policy_loss", dropped)
    check = next(c for c in policy_loss_bench.checks() if c.dtype == torch.float32 and c.shape.startswith("B=4 "))
    with backend.use_backend("cpp"):
        error, limit = check.run(torch.device("cpu"))["grad logp"]
    assert error > limit


def test_group_advantages_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("group_advantages",))
    assert ok and table.row_count >= 3 * 4 * 3  # shapes x estimators x dtypes


def test_linear_policy_loss_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("linear_policy_loss",))
    assert ok and table.row_count >= 3 * 3 * 3  # shapes x dtypes x (loss, grad hidden, grad weight)


def test_rollout_correction_passes_on_the_cpp_backend():
    table, ok = verify.run(interpret=False, ops=("rollout_correction",))
    assert ok and table.row_count >= 3 * 2 * 3 * 4  # shapes x levels x dtypes x (weights, three metrics)
