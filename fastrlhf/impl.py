"""The one place where a trainer's ``impl`` picks its ops: ``"fused"`` takes them from ``fastrlhf``,
``"reference"`` from ``fastrlhf.reference`` (plain torch, same signatures and semantics)."""

from __future__ import annotations

import importlib

from fastrlhf import checks

IMPLS = ("fused", "reference")
NAMES = ("gae", "masked_whiten", "linear_logprobs", "reward_model_loss")


class Ops:
    """``Ops(impl).gae``, ``.masked_whiten``, ``.linear_logprobs``, ``.reward_model_loss``.

    Each op is looked up when first used, so a trainer that never calls one does not need it.
    """

    def __init__(self, impl: str):
        checks.one_of("impl", impl, IMPLS)
        self.impl = impl

    def __getattr__(self, name: str):
        if name not in NAMES:
            raise AttributeError(name)
        module = importlib.import_module("fastrlhf" if self.impl == "fused" else "fastrlhf.reference")
        op = getattr(module, name)
        setattr(self, name, op)
        return op
