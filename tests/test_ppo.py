import math
import os
import sys

import pytest
import torch

from fastrlhf import checkpoint
from fastrlhf.models import ValueModel
from fastrlhf.policy_trainer import LOSS_AGGREGATIONS, RunningMoments
from fastrlhf.ppo import KLController, PPOTrainer, aggregate, kl_estimate, value_loss

# the DDP test's worker processes import the helpers by module name, so they live on sys.path
sys.path.insert(0, os.path.dirname(__file__))
from ppo_helpers import (EOS, P, PAD, assert_ddp_matches_one_batch,  # noqa: E402
                         assert_fused_equals_reference_first_step, assert_resume_gives_the_same_next_step,
                         assert_same_params, batch, config, hugging_face_models, models, params, trainer)


# -- loss terms against float64 formulas written out element by element ----------------------------


def test_kl_estimators_match_formulas():
    logp = torch.tensor([-0.5, -3.0, -30.0, -1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-0.7, -1.0, -1.0, -30.0, -2.0], dtype=torch.float64)
    for estimator in ("k1", "k2", "k3"):
        expected = []
        for a, b in zip(logp.tolist(), ref.tolist()):
            log_r = min(max(a - b, -20.0), 20.0)
            value = {"k1": log_r, "k2": log_r * log_r / 2, "k3": math.exp(-log_r) - 1 + log_r}[estimator]
            expected.append(min(max(value, -10.0), 10.0) if estimator == "k3" else value)
        torch.testing.assert_close(kl_estimate(logp, ref, estimator), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_formula(clip):
    g = torch.Generator().manual_seed(0)
    v, old, ret = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(3))
    expected, clipped_flags = [], []
    for a, b, c in zip(v.tolist(), old.tolist(), ret.tolist()):
        plain = (a - c) ** 2
        if clip is None:
            expected.append(0.5 * plain)
            clipped_flags.append(False)
            continue
        clipped = (b + min(max(a - b, -clip), clip) - c) ** 2
        expected.append(0.5 * max(plain, clipped))
        clipped_flags.append(clipped > plain)
    loss, flags = value_loss(v, old, ret, clip)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    assert flags.tolist() == clipped_flags


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_matches_formula_and_splits_exactly(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) < 0.7
    mask[:, 0] = True
    x[~mask] = float("nan")  # garbage at padding must not leak
    rows = [[v for v, m in zip(xr, mr) if m] for xr, mr in zip(x.tolist(), mask.tolist())]
    tokens = sum(len(r) for r in rows)
    expected = {"token-mean": sum(sum(r) for r in rows) / tokens, "token-sum": sum(sum(r) for r in rows),
                "seq-mean-token-sum": sum(sum(r) for r in rows) / 6,
                "seq-mean-token-mean": sum(sum(r) / len(r) for r in rows) / 6,
                "seq-mean-token-sum-norm": sum(sum(r) for r in rows) / (6 * 5)}[mode]
    whole = aggregate(x, mask, mode, tokens=tokens, sequences=6, horizon=5)
    parts = sum(aggregate(x[s], mask[s], mode, tokens=tokens, sequences=6, horizon=5)
                for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    torch.testing.assert_close(whole, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(parts, whole)


def test_kl_controller():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=1.0, horizon=100)
    adaptive.update(10.0, 10)  # error 9, clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    adaptive.update(0.95, 10)  # error -0.05, inside the clip
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.1) * (1 - 0.05 * 0.1))


def test_running_moments_match_all_scores():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1 for n in (5, 17, 2)]
    moments = RunningMoments()
    for c in chunks:
        moments.update(c.sum().item(), c.square().sum().item(), c.numel())
    everything = torch.cat(chunks)
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.var == pytest.approx(everything.var(unbiased=False).item())


# -- the trainer -----------------------------------------------------------------------------------


class PositionScore(ValueModel):
    """A reward model whose value at position t is t, so the score says where it was read."""

    def forward(self, input_ids, return_hidden=False):
        return torch.arange(input_ids.shape[1], dtype=torch.float32).expand(input_ids.shape).clone()


def test_score_read_at_eos_and_missing_eos_penalised():
    policy, rm = models()
    t = PPOTrainer(policy, rm, config(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False))
    t.reward_model = PositionScore(rm.backbone)
    prompts, responses = batch()
    mask = responses != PAD
    experience, metrics = t._experience(prompts, responses, mask)
    last = P + mask.sum(1) - 1  # the EOS itself, not the pad after it
    has_eos = (responses == EOS).any(1)
    assert metrics["score"] == pytest.approx(last.double().mean().item())
    assert metrics["eos_share"] == pytest.approx(has_eos.double().mean().item())
    # lambda = gamma = 1, no KL: every token's return is the final reward
    expected = last.float() - 0.5 * (~has_eos).float()
    torch.testing.assert_close(experience.returns[:, 0], expected)


def test_fused_and_reference_give_the_same_first_step():
    assert_fused_equals_reference_first_step("ppo", ("old_logp", "ref_logp", "values", "advantages", "returns"),
                                             kl_in_loss=True, ent_coef=0.01)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_gradient_accumulation_matches_one_batch(mode):
    prompts, responses = batch()
    whole, accumulated = trainer(loss_agg=mode, sgd=True), trainer(loss_agg=mode, micro_batch_size=3, sgd=True)
    whole.step(prompts, responses)
    accumulated.step(prompts, responses)
    assert_same_params(params(whole), params(accumulated), rtol=1e-5, atol=1e-6)


def test_target_kl_stops_the_epochs():
    prompts, responses = batch()
    assert trainer(ppo_epochs=4, num_minibatches=2).step(prompts, responses)["updates"] == 8
    # approx_kl is measured in each minibatch's forward, before its update: the first one sees the
    # rollout policy itself (KL 0), the second the policy after one update
    assert trainer(ppo_epochs=4, num_minibatches=2, target_kl=1e-12).step(prompts, responses)["updates"] == 2


def test_resume_gives_the_same_next_step(tmp_path):
    assert_resume_gives_the_same_next_step(tmp_path, "ppo", ("score", "kl_coef"), kl_target=0.5, reward_norm=True,
                                           num_minibatches=2)


def test_bad_checkpoints_are_rejected_and_change_nothing(tmp_path):
    prompts, responses = batch()
    t = trainer()
    t.step(prompts, responses)
    path = tmp_path / "run.ckpt"
    t.save(path)
    data = path.read_bytes()
    fresh = trainer()
    before = params(fresh)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for name in ("flipped", "truncated", "junk"):
        with pytest.raises(checkpoint.CheckpointError, match="corrupt|not a readable"):
            fresh.load(tmp_path / f"{name}.ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="kl_coef: saved 0.1, now 0.2"):
        trainer(kl_coef=0.2).load(path)
    with pytest.raises(checkpoint.CheckpointError, match="policy does not match"):
        trainer(d_model=32).load(path)
    assert_same_params(before, params(fresh), rtol=0, atol=0)
    assert fresh.step_count == 0


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    prompts, responses = batch()
    t = trainer()
    path = tmp_path / "run.ckpt"
    t.save(path)
    saved = path.read_bytes()
    t.step(prompts, responses)

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        t.save(path)
    assert path.read_bytes() == saved
    assert os.listdir(tmp_path) == ["run.ckpt"]


# -- DistributedDataParallel -----------------------------------------------------------------------

def test_two_process_ddp_matches_one_process_on_the_union_batch(tmp_path):
    assert_ddp_matches_one_batch(tmp_path, "ppo", ("score", "kl", "policy_loss", "value_loss", "kl_coef",
                                                   "explained_variance"))


def test_hugging_face_policy_and_reward_model():
    t = PPOTrainer(*hugging_face_models(), config())
    assert t.critic.backbone.output_weight.requires_grad  # tied to the input embedding, so still trained
    before = params(t)
    metrics = t.step(*batch())
    assert all(math.isfinite(metrics[k]) for k in ("policy_loss", "value_loss", "kl", "approx_kl"))
    assert any(not torch.equal(a, b) for a, b in zip(before, params(t)))
