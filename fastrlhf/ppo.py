"""PPO for language models, the whole algorithm in one file (in the spirit of cleanrl).

One ``PPOTrainer.step(prompts)``:

1. rollout: sample a response per prompt (temperature, optional top-k, stop at EOS, right padding);
2. experience: log-probs of the policy and of the frozen reference (``linear_logprobs`` from hidden
   states and the LM head weight: the logits are never materialised), the critic's values, and the
   reward model's score at the last response token (the EOS itself, never the pad after it);
3. per-token rewards: the score at the last token minus ``kl_coef`` times the per-token KL estimate
   (or the KL as a loss term with ``kl_in_loss``), then ``gae`` and ``masked_whiten``;
4. ``ppo_epochs`` passes over shuffled minibatches: the clipped surrogate (separate low/high clip,
   optional dual clip) with its entropy bonus from ``linear_policy_loss`` on the policy's last hidden
   states, the clipped value loss, gradient clipping, optional ``target_kl`` early stop (on the op's
   ``approx_kl``);
5. the KL coefficient adapts (Ziegler et al.'s proportional controller) or stays fixed.

Rollout, scoring, the update loop, global statistics and checkpoints are shared with GRPO in
``fastrlhf/policy_trainer.py``: there every loss is a micro-batch's sum over tokens divided by a
normaliser counted over the whole minibatch on all ranks, so gradient accumulation and
DistributedDataParallel give the update of one big batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from fastrlhf import checks
from fastrlhf.models import disable_dropout, freeze_unread_lm_head
from fastrlhf.policy_trainer import Experience, PolicyTrainer, RLConfig

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class PPOConfig(RLConfig):
    """``RLConfig`` (rollout, score, update settings) and PPO's own."""
    kl_estimator: str = "k1"  # k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r - 1 + log r, with r = pi / pi_ref
    kl_coef: float = 0.05
    kl_target: float | None = None  # set: adaptive coefficient aiming at this per-sequence KL
    kl_horizon: int = 10000
    kl_in_loss: bool = False  # the KL as a loss term rather than a per-token reward
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    critic_lr: float | None = None  # defaults to lr

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)


# ---------------------------------------------------------------------------------------------------
# Loss terms: per-token tensors, aggregated by ``aggregate``.


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, as verl computes it:
    the log-ratio clamped to +-20, and k3 clamped to +-10."""
    log_ratio = (logp - ref_logp).clamp(-20.0, 20.0)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return (torch.exp(-log_ratio) - 1.0 + log_ratio).clamp(-10.0, 10.0)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """Per-token ``0.5 max((V - R)^2, (V_clipped - R)^2)`` with ``V_clipped = V_old + clip(V - V_old,
    -clip, clip)`` (plain ``0.5 (V - R)^2`` without ``clip``), and where the clipped term is the larger."""
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(per_token: Tensor, mask: Tensor, mode: str, *, tokens: float, sequences: float, horizon: int) -> Tensor:
    """This micro-batch's share of a minibatch loss, with ``linear_policy_loss``'s aggregations (the
    value loss is aggregated as the policy loss is); ``tokens`` and ``sequences`` count the whole
    minibatch on all ranks, so summing the shares gives the loss of the minibatch as one batch.

    - ``token-mean``: sum over valid tokens / ``tokens``; ``token-sum``: the sum itself;
    - ``seq-mean-token-sum``: each sequence's sum over its tokens, summed / ``sequences``;
    - ``seq-mean-token-mean``: each sequence's mean over its tokens, summed / ``sequences``;
    - ``seq-mean-token-sum-norm``: sum over valid tokens / (``sequences`` x ``horizon``), Dr. GRPO's
      constant normaliser (``horizon`` = max new tokens).
    """
    x = torch.where(mask, per_token, 0.0)
    if mode == "token-mean":
        return x.sum() / tokens
    if mode == "token-sum":
        return x.sum()
    if mode == "seq-mean-token-sum":
        return x.sum() / sequences
    if mode == "seq-mean-token-mean":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    return x.sum() / (sequences * horizon)


class KLController:
    """The KL coefficient: fixed, or with ``target`` Ziegler et al.'s proportional controller,
    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon`` after each batch of n sequences."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon


# ---------------------------------------------------------------------------------------------------


@dataclass
class PPOExperience(Experience):
    """``Experience`` with the critic's ``values`` and the GAE ``returns``, ``[B, R]``."""
    values: Tensor
    returns: Tensor


class PPOTrainer(PolicyTrainer):
    """PPO on a causal LM against a learned reward model.

    Args:
        policy: the LM to train (``policy(ids) -> hidden``, ``policy.output_weight``): a ``TinyGPT``, an
            ``HFCausalLM``, or a Hugging Face causal LM (wrapped in ``HFCausalLM`` here).
        reward_model: a ``ValueModel`` (frozen here); the critic starts as a copy of it.
        config: a ``PPOConfig``.
        impl: ``"fused"`` (fastrlhf's ops) or ``"reference"`` (their plain-torch references).

    The reference policy is a frozen copy of ``policy`` as given. Under ``torch.distributed`` (one
    process per rank, e.g. ``torchrun``) the policy and critic are wrapped in DDP; every rank must pass
    the same number of prompts to ``step``.
    """

    KIND = "ppo"

    def __init__(self, policy, reward_model, config: PPOConfig, *, impl: str = "fused"):
        super().__init__(policy, reward_model, config, impl)
        self.critic = disable_dropout(copy.deepcopy(self.reward_model)).requires_grad_(True)
        freeze_unread_lm_head(self.critic)
        self.critic_train = self._ddp(self.critic)
        self.models["critic"] = self.critic
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in self.policy.parameters() if p.requires_grad]},
            {"params": [p for p in self.critic.parameters() if p.requires_grad], "lr": config.critic_lr or config.lr},
        ], lr=config.lr, weight_decay=0.0)
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)

    def step(self, prompts: Tensor, responses: Tensor | None = None) -> dict[str, float]:
        """One PPO step on this rank's ``prompts`` (``[B, P]`` int64). ``responses`` (``[B, R]``, right
        padded, ``R = max_new_tokens``) skips sampling, for tests and offline data. Returns the metrics."""
        start = self._start()
        responses, mask = self._rollout(prompts, responses)
        experience, metrics = self._experience(prompts, responses, mask)
        metrics.update(self._update(experience))
        metrics["kl_coef"] = self.kl.value
        self.kl.update(metrics["kl"], prompts.shape[0] * self.world)
        return self._finish(metrics, start, prompts.shape[0])

    @torch.no_grad()
    def _experience(self, prompts: Tensor, responses: Tensor, mask: Tensor) -> tuple[PPOExperience, dict]:
        cfg, P = self.cfg, prompts.shape[1]
        ids = torch.cat([prompts, responses], dim=1)
        old_logp = self.response_logprobs(self.policy, ids, mask, P)
        ref_logp = self.response_logprobs(self.ref_policy, ids, mask, P)
        values = self.critic(ids)[:, P - 1:-1]
        raw_scores, scores, has_eos, last = self.score(ids, mask, P)
        kl = torch.where(mask, kl_estimate(old_logp, ref_logp, cfg.kl_estimator), 0.0)
        rewards = torch.zeros_like(kl) if cfg.kl_in_loss else -self.kl.value * kl
        rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
        advantages, returns = self.ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = self._global_rows(self.ops.masked_whiten, advantages, mask)
        metrics = self._global_means({
            "score": raw_scores, "kl": kl.sum(1), "response_length": mask.sum(1).float(), "eos_share": has_eos.float(),
        })
        metrics["explained_variance"] = self._explained_variance(values, returns, mask)
        return PPOExperience(ids, mask, old_logp, ref_logp, advantages, values, returns), metrics

    def _loss(self, exp: PPOExperience, rows: Tensor, tokens: float, sequences: float) -> tuple[Tensor, dict]:
        """The policy loss (``linear_policy_loss``: clipped surrogate, entropy bonus, and with
        ``kl_in_loss`` the KL term) plus ``vf_coef`` times the clipped value loss; see ``PolicyTrainer._loss``."""
        cfg = self.cfg
        kl_options = {"ref_logp": exp.ref_logp[rows], "kl_coef": self.kl.value} if cfg.kl_in_loss else {}
        loss, shares = self._policy_loss(exp, rows, tokens, sequences, loss_type="ppo",
                                         kl_estimator=cfg.kl_estimator, **kl_options)
        ids, mask = exp.ids[rows], exp.mask[rows]
        values = self.critic_train(ids)[:, ids.shape[1] - mask.shape[1] - 1:-1]
        vf, vf_clipped = value_loss(values, exp.values[rows], exp.returns[rows], cfg.value_clip)
        vf_loss = aggregate(vf, mask, cfg.loss_agg, tokens=tokens, sequences=sequences, horizon=cfg.max_new_tokens)
        shares["value_loss"] = vf_loss.detach()
        shares["vf_clipfrac"] = (vf_clipped & mask).sum() / tokens
        return loss + cfg.vf_coef * vf_loss, shares

    def _explained_variance(self, values: Tensor, returns: Tensor, mask: Tensor) -> float:
        """``1 - Var(returns - values) / Var(returns)`` over the valid tokens of the global batch."""
        r, d = returns[mask].double(), (returns - values)[mask].double()
        n, sr, sr2, sd, sd2 = self._all_sum(torch.stack([
            r.new_tensor(float(r.numel())), r.sum(), r.square().sum(), d.sum(), d.square().sum()])).tolist()
        var_r = sr2 / n - (sr / n) ** 2
        return float("nan") if var_r <= 0 else 1.0 - (sd2 / n - (sd / n) ** 2) / var_r

    def _extra_state(self) -> dict:
        return {"kl_coef": self.kl.value}

    def _restore_extra_state(self, state: dict) -> None:
        self.kl.value = state["kl_coef"]
