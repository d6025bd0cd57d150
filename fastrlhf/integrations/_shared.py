"""What the verl, TRL and OpenRLHF integrations share: entropy alone from ``fastrlhf.logprobs``, the
``match_dtype`` option of their ``patch()``, and replacements that take a call's arguments by name."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

import fastrlhf


def by_name(original: Callable, run: Callable[[dict], Any]) -> Callable:
    """A replacement of ``original`` that calls ``run`` with the call's arguments by the names of
    ``original``'s signature (defaults applied), and ``original`` itself where they do not bind or ``run``
    returns None (a call fastrlhf does not cover; ``original`` then answers or raises as it does)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        try:
            call = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        call.apply_defaults()
        result = run(call.arguments)
        return original(*args, **kwargs) if result is None else result
    return replacement


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim (fp32; fp64 for fp64 logits), in one pass; the
    labels are a dummy 0."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fastrlhf.logprobs(logits, labels, return_entropy=True)[1]


def matching_dtype(factory: Callable, match_dtype: bool, original_dtype: Callable[..., torch.dtype]) -> Callable:
    """``factory`` (original -> replacement), whose replacement returns fastrlhf's fp32 (fp64) log-probs or
    entropies; with ``match_dtype``, each floating tensor it returns (alone or in a tuple; None and boolean
    outputs pass) is cast to ``original_dtype(*args, **kwargs)``, the dtype the package's own function
    returns for the same call (the cast's backward passes the gradient through to fp32)."""
    if not match_dtype:
        return factory

    def matched_factory(original):
        replacement = factory(original)

        @functools.wraps(original)
        def matched(*args, **kwargs):
            dtype = original_dtype(*args, **kwargs)
            out = replacement(*args, **kwargs)
            cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            return tuple(cast(x) for x in out) if isinstance(out, tuple) else cast(out)
        return matched
    return matched_factory


def logits_dtype(logits: torch.Tensor, *args, **kwargs) -> torch.dtype:
    """The dtype of the first argument, the logits: what plain-torch paths (log_softmax, softmax) return."""
    return logits.dtype
