"""The one place where a trainer's ``impl`` picks its ops: ``"fused"`` takes them from ``fastrlhf``,
``"reference"`` from ``fastrlhf.reference`` (plain torch, same signatures and semantics)."""

from __future__ import annotations

import fastrlhf
from fastrlhf import checks, reference

IMPLS = ("fused", "reference")
NAMES = ("gae", "masked_whiten", "linear_logprobs", "reward_model_loss", "group_advantages", "linear_policy_loss")


class Ops:
    """``Ops(impl).gae``, ``.masked_whiten``, ``.linear_logprobs``, ``.reward_model_loss``, ``.group_advantages``,
    ``.linear_policy_loss``."""

    def __init__(self, impl: str):
        checks.one_of("impl", impl, IMPLS)
        self.impl = impl
        source = fastrlhf if impl == "fused" else reference
        for name in NAMES:
            setattr(self, name, getattr(source, name))
