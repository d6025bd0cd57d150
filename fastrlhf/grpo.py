"""GRPO and its critic-free relatives for language models, the whole algorithm in one file.

One ``GRPOTrainer.step(prompts)``:

1. rollout: ``n`` responses per prompt (temperature, optional top-k, stop at EOS, right padding);
2. experience: log-probs of the policy and of the frozen reference (``linear_logprobs``), and the reward
   model's score at the last response token (the EOS itself, never the pad after it; a response
   without EOS loses ``missing_eos_penalty``);
3. advantages: ``group_advantages`` scores each response against the other responses to its prompt,
   with ``estimator``:
   - ``grpo``: ``(s - mean) / (std + eps)`` over the group (``scale="group"``), over the batch's std
     (``"batch"``), or just ``s - mean`` (``"none"``: Dr. GRPO, usually with
     ``loss_agg="seq-mean-token-sum-norm"``);
   - ``rloo``: the score minus the mean of the other ``n - 1``;
   - ``reinforce++-baseline``: ``s - mean``, whitened over the batch's tokens;
   - ``opo``: the score minus the group's length-weighted mean score;
   batch statistics are those of the global batch (all ranks);
4. ``ppo_epochs`` passes over shuffled minibatches of ``linear_policy_loss`` from the policy's last
   hidden states and LM head (the logits never exist): ``loss_type`` ppo (clipped ratio, optional dual
   clip), gspo (sequence ratio), cispo (clipped, detached ratio times log-prob) or sapo (soft gate); the
   KL to the reference policy as a loss term (``kl_coef``, ``kl_estimator`` k3 by default); the entropy
   bonus; gradient clipping; optional ``target_kl`` early stop.

There is no critic and no KL in the reward. Rollout, scoring, the update loop, global statistics and
checkpoints are shared with PPO in ``fastrlhf/policy_trainer.py``: every aggregation divides by counts of
the whole minibatch on all ranks, so gradient accumulation and DistributedDataParallel give the update of
one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastrlhf import checks
from fastrlhf.policy_trainer import Experience, PolicyTrainer, RLConfig

ESTIMATORS = ("grpo", "rloo", "reinforce++-baseline", "opo")
SCALES = ("group", "batch", "none")
LOSS_TYPES = ("ppo", "gspo", "cispo", "sapo")
KL_ESTIMATORS = tuple(e + plus for e in ("k1", "abs", "k2", "k3") for plus in ("", "+"))


@dataclass
class GRPOConfig(RLConfig):
    """``RLConfig`` (rollout, score, update settings) and GRPO's own. Dr. GRPO is ``estimator="grpo"``,
    ``scale="none"``, ``loss_agg="seq-mean-token-sum-norm"``."""
    n: int = 4  # responses per prompt
    estimator: str = "grpo"
    scale: str = "group"  # grpo only: divide by the group's std, the batch's, or not at all
    eps: float = 1e-6  # grpo only: added to the std
    unbiased: bool = True  # grpo only: Bessel's correction in the std
    loss_type: str = "ppo"
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_coef: float = 0.001  # the KL to the reference policy as a loss term (0: off)
    kl_estimator: str = "k3"  # k1, abs, k2, k3; "+": that value with the gradient of k2
    ppo_epochs: int = 1

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("estimator", self.estimator, ESTIMATORS)
        checks.one_of("scale", self.scale, SCALES)
        checks.one_of("loss_type", self.loss_type, LOSS_TYPES)
        checks.one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.n < 1:
            raise ValueError(f"n: expected at least 1 response per prompt, got {self.n}")


class GRPOTrainer(PolicyTrainer):
    """GRPO (and Dr. GRPO, RLOO, REINFORCE++-baseline, OPO) on a causal LM against a learned reward model.

    Args: ``policy`` and ``impl`` as for ``PPOTrainer`` (``impl="reference"``: log-probs and loss in plain
    torch from the full logits); ``reward_model`` a ``ValueModel`` (frozen here); ``config`` a ``GRPOConfig``.

    The reference policy is a frozen copy of ``policy`` as given. Under ``torch.distributed`` (one
    process per rank, e.g. ``torchrun``) the policy is wrapped in DDP; every rank must pass the same
    number of prompts to ``step``, and a prompt's ``n`` responses stay on its rank.
    """

    KIND = "grpo"

    def __init__(self, policy, reward_model, config: GRPOConfig, *, impl: str = "fused"):
        super().__init__(policy, reward_model, config, impl)
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=0.0)

    def step(self, prompts: Tensor, responses: Tensor | None = None) -> dict[str, float]:
        """One step on this rank's ``prompts`` (``[B, P]`` int64). ``responses`` (``[B * n, R]``, right
        padded, ``R = max_new_tokens``; rows ``i * n`` to ``i * n + n - 1`` answer prompt ``i``) skips
        sampling, for tests and offline data. Returns the metrics."""
        start = self._start()
        prompts = prompts.repeat_interleave(self.cfg.n, dim=0)
        responses, mask = self._rollout(prompts, responses)
        experience, metrics = self._experience(prompts, responses, mask)
        metrics.update(self._update(experience))
        return self._finish(metrics, start, prompts.shape[0])

    @torch.no_grad()
    def _experience(self, prompts: Tensor, responses: Tensor, mask: Tensor) -> tuple[Experience, dict]:
        cfg, (B, P) = self.cfg, prompts.shape
        ids = torch.cat([prompts, responses], dim=1)
        old_logp = self.response_logprobs(self.policy, ids, mask, P)
        ref_logp = self.response_logprobs(self.ref_policy, ids, mask, P)
        raw_scores, scores, has_eos, last = self.score(ids, mask, P)
        # token-level scores (the score at the last token) serve every estimator, and give the
        # advantage at every response token
        token_scores = torch.zeros_like(old_logp).scatter(1, last[:, None], scores[:, None].to(old_logp.dtype))
        groups = torch.arange(B, device=self.device) // cfg.n + self.rank * (B // cfg.n)  # unique on all ranks
        advantages = self._global_rows(self._group_advantages, token_scores, mask, groups)
        grouped = scores.view(-1, cfg.n)
        metrics = self._global_means({
            "score": raw_scores, "kl": torch.where(mask, old_logp - ref_logp, 0.0).sum(1),
            "response_length": mask.sum(1).float(), "eos_share": has_eos.float(),
        })
        metrics.update(self._global_means({"tied_group_share": (grouped == grouped[:, :1]).all(1).float()}))
        return Experience(ids, mask, old_logp, ref_logp, advantages), metrics

    def _group_advantages(self, token_scores: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
        cfg = self.cfg
        return self.ops.group_advantages(token_scores, groups, estimator=cfg.estimator, mask=mask, scale=cfg.scale,
                                         eps=cfg.eps, unbiased=cfg.unbiased)

    def _loss(self, exp: Experience, rows: Tensor, tokens: float, sequences: float) -> tuple[Tensor, dict]:
        """``linear_policy_loss`` with this config's loss type and KL term; see ``PolicyTrainer._loss``."""
        cfg = self.cfg
        return self._policy_loss(exp, rows, tokens, sequences, loss_type=cfg.loss_type, sapo_tau_pos=cfg.sapo_tau_pos,
                                 sapo_tau_neg=cfg.sapo_tau_neg, ref_logp=exp.ref_logp[rows], kl_coef=cfg.kl_coef,
                                 kl_estimator=cfg.kl_estimator)
