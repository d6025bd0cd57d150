"""``fastrlhf bench --integrations``: each function a ``patch()`` swaps in, against the package's own, on
the same inputs. Packages that are not importable here are left out, with a warning saying why."""

from __future__ import annotations

import importlib
import warnings

import torch

from fastrlhf.bench.case import Case
from fastrlhf.bench.gae import BYTES_PER_ELEMENT as GAE_BYTES_PER_ELEMENT
from fastrlhf.bench.gae import _inputs as rollout
from fastrlhf.integrations._patch import require, resolve

VOCAB = 32000
PACKAGES = {
    "verl": ("compute_gae_advantage_return", "logprobs_from_logits", "entropy_from_logits"),
    "trl": ("selective_log_softmax", "entropy_from_logits"),
    "openrlhf": ("get_advantages_and_returns", "log_probs_from_logits", "compute_entropy"),
}


def _logits(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(tokens, VOCAB, generator=g), torch.randint(0, VOCAB, (tokens,), generator=g)


def _same(got, want):
    for x, y in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-4)


def _calls(name: str, fn):
    """How the package's trainers call ``fn`` on the bench inputs."""
    gae = lambda r, v, m: fn(r, v, m, 1.0, 0.95)  # noqa: E731
    if name == "get_advantages_and_returns":
        gae = lambda r, v, m: fn(None, v, r, m, 1.0, 0.95)  # noqa: E731
    entropy = lambda logits, labels: fn(logits)  # noqa: E731
    return {"compute_gae_advantage_return": gae, "get_advantages_and_returns": gae,
            "entropy_from_logits": entropy, "compute_entropy": entropy}.get(name, fn)


def cases(quick: bool) -> list[Case]:
    tokens, (B, T) = (512, (256, 256)) if quick else (2048, (256, 2048))
    out = []
    for package, names in PACKAGES.items():
        integration = importlib.import_module(f"fastrlhf.integrations.{package}")
        try:
            require(package, integration.MODULES, integration.TESTED)
            if package == "openrlhf":
                require(package, (integration.EXPERIENCE,), integration.TESTED)
        except ImportError as err:
            warnings.warn(f"{package} is not benchmarked: {err.__cause__}", stacklevel=2)
            continue
        for target, factory in integration.replacements().items():
            name = target.rsplit(".", 1)[-1].rsplit(":", 1)[-1]
            if name not in names:
                continue
            original = resolve(target)[2]
            fused, reference = _calls(name, factory(original)), _calls(name, original)
            if "advantage" in name:
                out.append(Case(f"{package} {name}", f"B={B} T={T} fp32", lambda: rollout(B, T), fused,
                                {package: reference}, GAE_BYTES_PER_ELEMENT * B * T, _same, x=T))
            else:
                out.append(Case(f"{package} {name}", f"N={tokens} V={VOCAB} fp32", lambda: _logits(tokens), fused,
                                {package: reference}, tokens * (4 * VOCAB + 8 + 4), _same, x=tokens))
    return out

