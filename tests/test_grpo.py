import math
import os
import sys

import pytest
import torch

from fastrlhf import checkpoint, reference
from fastrlhf.grpo import GRPOConfig, GRPOTrainer
from fastrlhf.policy_trainer import LOSS_AGGREGATIONS
from fastrlhf.sampling import response_mask

# the DDP test's worker processes import the helpers by module name, so they live on sys.path
sys.path.insert(0, os.path.dirname(__file__))
from ppo_helpers import (EOS, N, P, assert_ddp_matches_one_batch,  # noqa: E402
                         assert_fused_equals_reference_first_step, assert_resume_gives_the_same_next_step,
                         assert_same_params, config, grpo_batch, hugging_face_models, models, params, trainer)


def test_config_rejects_unknown_options():
    for name, value in (("estimator", "ppo"), ("scale", "rows"), ("loss_type", "dpo"), ("kl_estimator", "k4"),
                        ("loss_agg", "mean")):
        with pytest.raises(ValueError, match=name):
            GRPOConfig(**{name: value})
    with pytest.raises(ValueError, match="n: expected at least 1"):
        GRPOConfig(n=0)


def test_advantages_are_group_advantages_of_the_scores_at_the_last_token():
    t = trainer(algo="grpo", estimator="rloo", missing_eos_penalty=0.5)
    prompts, responses = grpo_batch()
    mask = response_mask(responses, EOS)
    ids = torch.cat([prompts.repeat_interleave(N, 0), responses], 1)
    experience, metrics = t._experience(ids[:, :P], responses, mask)
    last = P + mask.sum(1) - 1  # the EOS itself, not the pad after it
    raw = t.reward_model(ids).gather(1, last[:, None])[:, 0]
    has_eos = (responses == EOS).any(1)
    scores = (raw - 0.5 * (~has_eos)).double()
    for g in range(len(prompts)):  # rloo: the score less the mean of the other N - 1
        rows = slice(g * N, g * N + N)
        expected = (scores[rows] - (scores[rows].sum() - scores[rows]) / (N - 1)).float()
        torch.testing.assert_close(experience.advantages[rows, 0], expected, rtol=1e-5, atol=1e-6)
    assert torch.all(experience.advantages[~mask] == 0)
    assert metrics["score"] == pytest.approx(raw.double().mean().item())
    assert metrics["eos_share"] == pytest.approx(has_eos.double().mean().item())


@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo", "sapo"])
def test_fused_and_reference_give_the_same_first_step(loss_type):
    assert_fused_equals_reference_first_step("grpo", ("old_logp", "ref_logp", "advantages"), loss_type=loss_type,
                                             ent_coef=0.01)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_gradient_accumulation_matches_one_batch(mode):
    prompts, responses = grpo_batch()
    overrides = {"algo": "grpo", "loss_agg": mode, "sgd": True, "ent_coef": 0.01}
    whole, accumulated = trainer(**overrides), trainer(micro_batch_size=3, **overrides)
    whole.step(prompts, responses)
    accumulated.step(prompts, responses)
    assert_same_params(params(whole), params(accumulated), rtol=1e-5, atol=1e-6)


def test_target_kl_stops_the_epochs():
    prompts, responses = grpo_batch()
    assert trainer(algo="grpo", ppo_epochs=3, num_minibatches=2).step(prompts, responses)["updates"] == 6
    # the first minibatch sees the rollout policy itself (approx_kl 0), the second the updated policy
    stopped = trainer(algo="grpo", ppo_epochs=3, num_minibatches=2, target_kl=1e-12).step(prompts, responses)
    assert stopped["updates"] == 2


def test_resume_gives_the_same_next_step(tmp_path):
    assert_resume_gives_the_same_next_step(tmp_path, "grpo", ("score", "policy_loss"), reward_norm=True,
                                           num_minibatches=2)


def test_checkpoints_of_another_run_are_rejected(tmp_path):
    path = tmp_path / "run.ckpt"
    trainer(algo="grpo").save(path)
    with pytest.raises(checkpoint.CheckpointError, match="estimator: saved 'grpo', now 'rloo'"):
        trainer(algo="grpo", estimator="rloo").load(path)
    with pytest.raises(checkpoint.CheckpointError, match="expected a ppo checkpoint, got a grpo checkpoint"):
        trainer(algo="ppo").load(path)


def test_reference_impl_runs_the_plain_torch_ops():
    t = GRPOTrainer(*models(), config("grpo"), impl="reference")
    assert t.ops.linear_policy_loss is reference.linear_policy_loss
    assert t.ops.group_advantages is reference.group_advantages


def test_two_process_ddp_matches_one_process_on_the_union_batch(tmp_path):
    assert_ddp_matches_one_batch(tmp_path, "grpo", ("score", "kl", "policy_loss", "kl_loss", "entropy", "approx_kl",
                                                    "clipfrac"))


def test_hugging_face_policy_and_reward_model():
    t = GRPOTrainer(*hugging_face_models(), config("grpo"))
    before = params(t)
    metrics = t.step(*grpo_batch())
    assert all(math.isfinite(metrics[k]) for k in ("policy_loss", "kl_loss", "kl", "approx_kl"))
    assert any(not torch.equal(a, b) for a, b in zip(before, params(t)))
