"""fastrlhf.integrations.verl, policy losses: verl's registered losses give the same loss, gradient and
metrics before and after patch(), and run verl's own code where fastrlhf does not cover the call."""

import pytest
import torch

from fastrlhf.bench.case import error_and_bound
from fastrlhf.integrations import verl as integration

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (with ray, tensordict, omegaconf, "
                                 "hydra-core, codetiming) is not installed: .ci/install-integrations")
verl_config = pytest.importorskip("verl.workers.config")

LOSSES = ("vanilla", "gspo", "cispo", "sapo", "gpg")
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
GLOBAL = {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 13, "loss_scale_factor": 50}


def actor_config(global_batch_info=None, **fields):
    config = verl_config.FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1,
                                         rollout_n=1, **fields)
    config.global_batch_info.update(global_batch_info or {})
    return config


def batch(B=7, T=40, seed=0, dtype=torch.float32):
    """Log-probs, old log-probs drifted enough for every clip to bind, advantages of both signs, IS weights,
    and a bool mask with right padding, holes and one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, T, generator=g) * 3
    old_log_prob = log_prob + 0.4 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    weights = torch.rand(B, T, generator=g) * 2
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    mask[2] = False
    return [t.to(dtype) for t in (log_prob, old_log_prob, advantages, weights)] + [mask]


def loss_call(name, mode, config, old, advantages, mask, weights=None):
    """The loss as a function of ``log_prob``, looked up in verl's registry at call time."""
    def call(log_prob):
        data = [None if t is None else t.to(log_prob.dtype) for t in (old, advantages, weights)]
        return core_algos.get_policy_loss_fn(name)(data[0], log_prob, data[1], mask, mode, config, data[2])
    return call


def assert_same_loss_and_metrics(matches_original, name, mode, config, with_weights=False, seed=0,
                                 dtype=torch.float32):
    log_prob, old, advantages, weights, mask = batch(seed=seed, dtype=dtype)
    call = loss_call(name, mode, config, old, advantages, mask, weights if with_weights else None)
    matches_original(lambda lp: call(lp)[0], integration.patch, (log_prob,))
    exact, before = call(log_prob.double())[1], call(log_prob)[1]
    with integration.patch():
        after = call(log_prob)[1]
    assert list(after) == list(before)
    assert [type(v) for v in after.values()] == [type(v) for v in before.values()] == [float] * len(before)
    for key in before:
        error, bound = error_and_bound(torch.tensor(after[key]), torch.tensor(exact[key], dtype=torch.float64),
                                       torch.tensor(before[key]))
        assert error <= bound, f"{key}: {after[key]} against verl's {before[key]} (float64 {exact[key]})"


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("global_batch_info", [{}, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_losses_match_verl(matches_original, name, mode, global_batch_info, with_weights):
    assert_same_loss_and_metrics(matches_original, name, mode, actor_config(global_batch_info), with_weights)


@pytest.mark.parametrize("mode", MODES)
def test_global_batch_info_as_verls_trainer_fills_it(matches_original, mode):
    """verl's ppo_loss sets every key, None where there is no global count."""
    info = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None}
    assert_same_loss_and_metrics(matches_original, "vanilla", mode, actor_config(info), seed=8)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", LOSSES)
def test_bf16_inputs(matches_original, name, mode):
    """fp32 arithmetic on bf16 inputs: at least as close to verl's float64 result as verl's bf16 one."""
    assert_same_loss_and_metrics(matches_original, name, mode, actor_config(), seed=9, dtype=torch.bfloat16)


@pytest.mark.parametrize("fields", [dict(clip_ratio=0.1), dict(clip_ratio_low=0.2, clip_ratio_high=0.28),
                                    dict(clip_ratio_low=0.05, clip_ratio_high=10.0, clip_ratio_c=1.5)],
                         ids=["symmetric", "dapo", "dual-clip-1.5"])
@pytest.mark.parametrize("name", ["vanilla", "gspo", "cispo"])
def test_clip_ratios(matches_original, name, fields):
    assert_same_loss_and_metrics(matches_original, name, "token-mean", actor_config(**fields), seed=1)


def test_sapo_temperatures_and_its_fixed_aggregation(matches_original):
    """SAPO aggregates seq-mean-token-mean whatever loss_agg_mode says, with the global batch size."""
    config = actor_config(GLOBAL, tau_pos=0.7, tau_neg=2.0)
    assert_same_loss_and_metrics(matches_original, "sapo", "token-sum", config, seed=2)


def test_counts_as_device_tensors(matches_original):
    info = {"dp_size": 4, "batch_num_tokens": torch.tensor(517), "global_batch_size": torch.tensor(20.0)}
    for mode in ("token-mean", "seq-mean-token-sum"):
        assert_same_loss_and_metrics(matches_original, "vanilla", mode, actor_config(info), seed=3)


def test_legacy_dict_config(matches_original):
    """verl's vanilla loss also takes an omegaconf DictConfig (the legacy workers')."""
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.3,
                                         "clip_ratio_c": 4.0, "global_batch_info": {}})
    assert_same_loss_and_metrics(matches_original, "vanilla", "seq-mean-token-mean", config, seed=4)


@pytest.mark.parametrize("global_batch_info", [{}, {"batch_num_tokens": torch.tensor(200)},
                                               {"global_batch_size": torch.tensor(9.0)}],
                         ids=["local", "int64-count", "fp32-count"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])  # bf16, and fp32 (verl promotes)
@pytest.mark.parametrize("name", ["vanilla", "sapo"])  # sapo: always seq-mean-token-mean
def test_match_dtype(dtypes_match, name, mode, global_batch_info):
    log_prob, old, advantages, _, mask = batch(seed=5, dtype=torch.bfloat16)
    call = loss_call(name, mode, actor_config(global_batch_info), old, advantages, mask)
    dtypes_match(lambda lp: call(lp)[0], integration.patch, (log_prob,))


def _fallback_cases():
    log_prob, old, advantages, weights, mask = batch(seed=6)
    ok = dict(old_log_prob=old, log_prob=log_prob, advantages=advantages, response_mask=mask,
              loss_agg_mode="token-mean", config=actor_config())
    return {
        "float mask": dict(ok, response_mask=mask.float() * 0.5),
        "old_log_prob requires grad": dict(ok, old_log_prob=old.clone().requires_grad_()),
        "fp64 advantages": dict(ok, advantages=advantages.double()),
        "per-sequence advantages": dict(ok, advantages=advantages[:, :1]),
        "weights [B, 1]": dict(ok, rollout_is_weights=weights[:, :1]),
        "unknown global_batch_info key": dict(ok, config=actor_config({"micro_batches": 2}), loss_agg_mode="token-sum"),
        "no config": dict(ok, config=None),
        "dp_size without counts": dict(ok, config=actor_config({"dp_size": 2})),
        "unknown loss_agg_mode": dict(ok, loss_agg_mode="token-median"),
        "zero token count": dict(ok, config=actor_config({"batch_num_tokens": 0})),
        "vanilla only: dual clip <= 1": dict(ok, config=actor_config(clip_ratio_c=1.0)),
    }


@pytest.mark.parametrize("name, case", [(name, case) for name in ("vanilla", "cispo") for case in _fallback_cases()
                                         if name == "vanilla" or not case.startswith("vanilla only")])
def test_fallback_runs_verls_function(name, case):
    """verl's own function's results (its agg_loss call fused), or the same error."""
    kwargs = _fallback_cases()[case]

    def run():
        try:
            return core_algos.get_policy_loss_fn(name)(**kwargs)
        except Exception as err:  # noqa: BLE001 - the error itself is what is compared
            return type(err), str(err)

    before = run()
    with integration.patch():
        after = run()
    if isinstance(before[0], type):
        assert after == before
    else:  # verl's function, whose own agg_loss call now runs the fused reduction: equal up to its rounding
        torch.testing.assert_close(after[0], before[0]) and after[1] == before[1]


def test_registry_returns_replacements_and_unpatch_restores():
    originals = {name: core_algos.get_policy_loss_fn(name) for name in LOSSES}
    with integration.patch():
        for name, original in originals.items():
            replaced = core_algos.get_policy_loss_fn(name)
            assert replaced is not original and replaced.__name__ == original.__name__
            assert getattr(core_algos, original.__name__) is replaced
        assert core_algos.get_policy_loss_fn("dppo_tv") is core_algos.compute_policy_loss_dppo_tv  # not replaced
    assert {name: core_algos.get_policy_loss_fn(name) for name in LOSSES} == originals
    assert all(getattr(core_algos, f.__name__) is f for f in originals.values())


def test_metrics_come_from_one_host_transfer(monkeypatch):
    """One ``.tolist()`` of one stacked tensor, no ``.item()`` per metric."""
    log_prob, old, advantages, _, mask = batch(seed=7)
    calls = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    with integration.patch():
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append("tolist") or tolist(t))
        monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item") or item(t))
        for name in LOSSES:
            calls.clear()
            core_algos.get_policy_loss_fn(name)(old, log_prob, advantages, mask, "token-mean", actor_config())
            assert calls == ([] if name == "gpg" else ["tolist"]), name


@pytest.mark.parametrize("counts", [{}, GLOBAL, {"dp_size": 1, "batch_num_tokens": torch.tensor(120.0),
                                                  "global_batch_size": torch.tensor(9.0)}],
                         ids=["local", "global", "tensors"])
@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_matches_verl(matches_original, mode, counts):
    """verl's agg_loss on the fused reduction: the same value and gradient of the loss matrix, each mode with
    this call's counts, global counts (dp_size 2) and counts as tensors."""
    loss_mat, _, _, _, mask = batch(seed=3)
    matches_original(lambda x: core_algos.agg_loss(x, mask, mode, **counts), integration.patch, (loss_mat,))


@pytest.mark.parametrize("case", ["float mask", "dp_size 2 without counts", "unknown mode"])
def test_agg_loss_falls_back(case):
    loss_mat, _, _, _, mask = batch(seed=4)
    args = {"float mask": (loss_mat, mask.float(), "token-mean"), "dp_size 2 without counts":
            (loss_mat, mask, "token-mean", 2), "unknown mode": (loss_mat, mask, "token-median")}[case]

    def run():
        try:
            return core_algos.agg_loss(*args)
        except Exception as err:  # noqa: BLE001 - the error itself is what is compared
            return type(err), str(err)

    original = core_algos.agg_loss
    before = run()
    with integration.patch():
        assert core_algos.agg_loss is not original
        after = run()
    assert after == before if isinstance(before, tuple) else torch.equal(after, before)


def test_agg_loss_never_reads_masked_entries():
    loss_mat, _, _, _, mask = batch(seed=5)
    poisoned = loss_mat.masked_fill(~mask, float("nan"))
    with integration.patch():
        assert torch.equal(core_algos.agg_loss(poisoned, mask, "token-mean"), core_algos.agg_loss(loss_mat, mask,
                                                                                                  "token-mean"))
