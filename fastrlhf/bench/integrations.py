"""``fastrlhf bench --integrations``: each function a ``patch()`` swaps in, against the package's own, on
the same inputs. Packages that are not importable here are left out, with a warning saying why."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import torch

from fastrlhf.bench.case import Case
from fastrlhf.bench.gae import BYTES_PER_ELEMENT as GAE_BYTES_PER_ELEMENT
from fastrlhf.bench.gae import _inputs as rollout
from fastrlhf.integrations._patch import require, resolve

VOCAB = 32000
HIDDEN = 1024
EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"
# target -> how the package's trainers call it, given the bench inputs of its kind
BENCHED = {
    "verl.trainer.ppo.core_algos:compute_gae_advantage_return": lambda fn: lambda r, v, m: fn(r, v, m, 1.0, 0.95),
    "verl.utils.torch_functional:logprobs_from_logits": lambda fn: fn,
    "verl.utils.torch_functional:entropy_from_logits": lambda fn: lambda logits, labels: fn(logits),
    "trl.trainer.utils:selective_log_softmax": lambda fn: fn,
    "trl.trainer.utils:entropy_from_logits": lambda fn: lambda logits, labels: fn(logits),
    "trl.kernels.chunked_logprob:ChunkedLogProbFunction.apply":  # as GRPO calls it, on its CPU (uncompacted) path
        lambda fn: lambda hidden, weight, labels: fn(hidden, weight, None, labels, 1.0, 32768, None, 1.0,
                                                     ("log_probs", "entropy"))[:2],
    f"{EXPERIENCE}:RemoteExperienceMaker.get_advantages_and_returns":
        lambda fn: lambda r, v, m: fn(None, v, r, m, 1.0, 0.95),
    "openrlhf.models.utils:log_probs_from_logits": lambda fn: fn,
    "openrlhf.models.utils:compute_entropy": lambda fn: lambda logits, labels: fn(logits),
    "verl.trainer.ppo.core_algos:compute_policy_loss_vanilla":  # as verl's actor calls it (dual clip 3)
        lambda fn: lambda old, logp, adv, mask: fn(old, logp, adv, mask, "token-mean", _actor_config())[0],
    "verl.trainer.ppo.core_algos:compute_grpo_outcome_advantage":
        lambda fn: lambda rewards, mask, uids: fn(rewards, mask, uids)[0],
}
GROUP = 8  # responses per prompt in the GRPO case


def _rollout(B: int, T: int):
    rewards, values, mask = rollout(B, T)
    return rewards, values, mask.long()  # verl's masks are numbers: it computes 1 - mask


def _logits(tokens: int, seed: int = 0):
    """[B, T, V] logits as the trainers hold them (B = 4 sequences), and [B, T] labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, tokens // 4)
    return 3 * torch.randn(*shape, VOCAB, generator=g), torch.randint(0, VOCAB, shape, generator=g)


def _hidden(tokens: int, seed: int = 0):
    """[tokens, H] last hidden states, a [V, H] head and [tokens] labels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, HIDDEN, generator=g), torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5,
            torch.randint(0, VOCAB, (tokens,), generator=g))


def _policy_batch(B: int, T: int, seed: int = 0):
    """log_prob, old_log_prob, advantages and a right-padded bool mask, as verl's actor passes them."""
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g)
    mask = torch.arange(T) < torch.randint(T // 2, T + 1, (B,), generator=g)[:, None]
    return logp + 0.3 * torch.randn(B, T, generator=g), logp, torch.randn(B, T, generator=g), mask


def _grpo_batch(B: int, T: int, seed: int = 0):
    """Token rewards, an int64 response mask and shuffled uid strings in groups of GROUP."""
    rewards, _, mask = _rollout(B, T)
    uids = np.array([f"uid-{i // GROUP}" for i in np.random.default_rng(seed).permutation(B)], dtype=object)
    return rewards, mask, uids


def _actor_config():
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1, rollout_n=1)


def _same(got, want):
    for x, y in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-4)


def cases(quick: bool) -> list[Case]:
    tokens, (B, T) = (512, (256, 256)) if quick else (2048, (256, 2048))
    out = []
    for package in ("verl", "trl", "openrlhf"):
        integration = importlib.import_module(f"fastrlhf.integrations.{package}")
        try:
            require(package, integration.MODULES, integration.TESTED)
            if package == "openrlhf":
                require(package, (EXPERIENCE,), integration.TESTED)
        except ImportError as err:
            warnings.warn(f"{package} is not benchmarked: {err.__cause__}", stacklevel=2)
            continue
        for target, factory in integration.replacements().items():
            if target not in BENCHED:
                continue
            name = target.split(":")[1].split(".")[-1]
            original = resolve(target)[2]
            fused, reference = BENCHED[target](factory(original)), BENCHED[target](original)
            if name == "compute_policy_loss_vanilla":  # forward: log-probs, old, advantages fp32 + bool mask
                out.append(Case(f"{package} {name}", f"B={B // 16} T={T} fp32", lambda: _policy_batch(B // 16, T),
                                fused, {package: reference}, 13 * (B // 16) * T, _same, x=T))
            elif name == "compute_grpo_outcome_advantage":  # rewards fp32 + int64 mask read, fp32 written
                out.append(Case(f"{package} {name}", f"B={B} T={T} G={GROUP} fp32", lambda: _grpo_batch(B, T),
                                fused, {package: reference}, 16 * B * T, _same, x=T))
            elif "advantage" in name:
                out.append(Case(f"{package} {name}", f"B={B} T={T} fp32", lambda: _rollout(B, T), fused,
                                {package: reference}, GAE_BYTES_PER_ELEMENT * B * T, _same, x=T))
            elif name == "apply":
                out.append(Case(f"{package} ChunkedLogProbFunction", f"N={tokens} H={HIDDEN} V={VOCAB} fp32",
                                lambda: _hidden(tokens), fused, {package: reference},
                                4 * (tokens * HIDDEN + VOCAB * HIDDEN) + tokens * (8 + 8), _same, x=tokens))
            else:
                out.append(Case(f"{package} {name}", f"B=4 T={tokens // 4} V={VOCAB} fp32", lambda: _logits(tokens),
                                fused,
                                {package: reference}, tokens * (4 * VOCAB + 8 + 4), _same, x=tokens))
    return out

