"""Reward-model training on preference pairs with ``reward_model_loss``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastrlhf.impl import Ops
from fastrlhf.models import ValueModel

IGNORE = -100


@dataclass
class PreferenceBatch:
    """``[B, T]`` int64 ids of the chosen and rejected sequences (prompt + response, right padded) and
    their ``[B, T]`` bool masks of real tokens; the reward is the value at each mask's last true token.
    ``margin``: optional ``[B]`` required gap r_chosen - r_rejected."""
    chosen_ids: Tensor
    chosen_mask: Tensor
    rejected_ids: Tensor
    rejected_mask: Tensor
    margin: Tensor | None = None

    def rows(self, index: Tensor) -> "PreferenceBatch":
        return PreferenceBatch(self.chosen_ids[index], self.chosen_mask[index], self.rejected_ids[index],
                               self.rejected_mask[index], None if self.margin is None else self.margin[index])


@dataclass
class RewardConfig:
    lr: float = 1e-4
    rank_coef: float = 1.0
    center_coef: float = 0.0  # TRL's reward centring, coef * mean((r_w + r_l)^2)
    lm_coef: float = 0.0  # imitation: coef * NLL of the chosen sequence under the backbone's LM head
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0


class RewardTrainer:
    """Trains a ``ValueModel`` so that its value at the last token ranks chosen above rejected.

    ``impl``: ``"fused"`` or ``"reference"`` ops (``reward_model_loss`` and, with ``lm_coef``,
    ``linear_logprobs``).
    """

    def __init__(self, model: ValueModel, config: RewardConfig | None = None, *, impl: str = "fused"):
        self.model, self.cfg, self.ops = model, config or RewardConfig(), Ops(impl)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr,
                                           weight_decay=self.cfg.weight_decay)

    def loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        chosen_values, chosen_hidden = self.model(batch.chosen_ids, return_hidden=True)
        rejected_values = self.model(batch.rejected_ids)
        chosen_logprobs = None
        if cfg.lm_coef > 0:
            # log p(token t | tokens < t) at column t; column 0 has no prediction and reads as 0
            labels = batch.chosen_ids[:, 1:].masked_fill(~batch.chosen_mask[:, 1:], IGNORE)
            logp = self.ops.linear_logprobs(chosen_hidden[:, :-1], self.model.backbone.output_weight, labels,
                                            ignore_index=IGNORE)
            chosen_logprobs = torch.cat([logp.new_zeros(logp.shape[0], 1), logp], dim=1)
        return self.ops.reward_model_loss(
            chosen_values, rejected_values, chosen_mask=batch.chosen_mask, rejected_mask=batch.rejected_mask,
            margin=batch.margin, rank_coef=cfg.rank_coef, center_coef=cfg.center_coef,
            chosen_logprobs=chosen_logprobs, lm_coef=cfg.lm_coef)

    def train_step(self, batch: PreferenceBatch) -> dict[str, float]:
        self.model.train()
        loss, stats = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        return {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

    @torch.no_grad()
    def evaluate(self, batch: PreferenceBatch, batch_size: int = 256) -> dict[str, float]:
        """Loss and pair accuracy on held-out pairs (weighted means over chunks of ``batch_size``)."""
        self.model.eval()
        n = batch.chosen_ids.shape[0]
        totals: dict[str, float] = {}
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            loss, stats = self.loss(batch.rows(rows))
            for k, v in {"loss": loss, **stats}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(rows) / n
        return totals
