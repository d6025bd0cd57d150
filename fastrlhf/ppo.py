"""PPO for language models, the whole algorithm in one file (in the spirit of cleanrl).

One ``PPOTrainer.step(prompts)``:

1. rollout: sample a response per prompt (temperature, optional top-k, stop at EOS, right padding);
2. experience: log-probs of the policy and of the frozen reference (``linear_logprobs`` from hidden
   states and the LM head weight: the logits are never materialised), the critic's values, and the
   reward model's score at the last response token (the EOS itself, never the pad after it);
3. per-token rewards: the score at the last token minus ``kl_coef`` times the per-token KL estimate
   (or the KL as a loss term with ``kl_in_loss``), then ``gae`` and ``masked_whiten``;
4. ``ppo_epochs`` passes over shuffled minibatches: clipped surrogate (separate low/high clip, optional
   dual clip), clipped value loss, entropy bonus, gradient clipping, optional ``target_kl`` early stop;
5. the KL coefficient adapts (Ziegler et al.'s proportional controller) or stays fixed.

Every loss is a sum over the tokens of a micro-batch divided by a normaliser counted over the whole
minibatch on all ranks, so gradient accumulation and DistributedDataParallel give the update of one big
batch (a mean of per-micro-batch means would not). Under ``torchrun`` each rank rolls out its own
prompts; gradients are all-reduced by DDP, and whitening, reward normalisation and metrics use global
statistics.
"""

from __future__ import annotations

import copy
import dataclasses
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fastrlhf import checkpoint, checks
from fastrlhf.impl import Ops
from fastrlhf.models import as_causal_lm, disable_dropout, freeze_unread_lm_head
from fastrlhf.sampling import generate, response_mask

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IGNORE = -100


@dataclass
class PPOConfig:
    # rollout
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    eos_id: int = 1
    pad_id: int = 0
    # rewards
    missing_eos_penalty: float | None = None  # subtracted from the score of a response without EOS
    kl_estimator: str = "k1"  # k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r - 1 + log r, with r = pi / pi_ref
    kl_coef: float = 0.05
    kl_target: float | None = None  # set: adaptive coefficient aiming at this per-sequence KL
    kl_horizon: int = 10000
    kl_in_loss: bool = False  # the KL as a loss term rather than a per-token reward
    reward_norm: bool = False  # scores standardised by the running mean and std of all scores so far
    reward_clip: float | None = None  # scores clipped to +-reward_clip (after normalisation)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # update
    ppo_epochs: int = 4
    num_minibatches: int = 1
    micro_batch_size: int | None = None  # gradient accumulation inside a minibatch
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # c > 1: for A < 0 the loss is at most -c A
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    target_kl: float | None = None  # stop this step's epochs once approx_kl (k3) exceeds it
    loss_agg: str = "token-mean"
    lr: float = 1e-5
    critic_lr: float | None = None  # defaults to lr
    seed: int = 0

    def __post_init__(self):
        checks.one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        checks.one_of("loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        if self.eos_id == self.pad_id:
            raise ValueError(f"eos_id and pad_id: expected distinct tokens, got {self.eos_id} for both")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip: expected a value > 1, got {self.dual_clip}")


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


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                dual_clip: float | None = None) -> Tensor:
    """Per-token clipped surrogate ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, ``r =
    exp(logp - old_logp)`` (log-ratio clamped to +-20); with ``dual_clip`` c, at most ``-c A`` where A < 0."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """Per-token ``0.5 max((V - R)^2, (V_clipped - R)^2)`` with ``V_clipped = V_old + clip(V - V_old,
    -clip, clip)`` (plain ``0.5 (V - R)^2`` without ``clip``), and where the clipped term is the larger."""
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(per_token: Tensor, mask: Tensor, mode: str, *, tokens: float, sequences: float, horizon: int) -> Tensor:
    """This micro-batch's share of a minibatch loss; ``tokens`` and ``sequences`` count the whole
    minibatch on all ranks, so summing the shares gives the loss of the minibatch as one batch.

    - ``token-mean``: sum over valid tokens / ``tokens``;
    - ``seq-mean-token-mean``: each sequence's mean over its tokens, summed / ``sequences``;
    - ``seq-mean-token-sum-norm``: sum over valid tokens / (``sequences`` x ``horizon``), Dr. GRPO's
      constant normaliser (``horizon`` = max new tokens).
    """
    x = torch.where(mask, per_token, 0.0)
    if mode == "token-mean":
        return x.sum() / tokens
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


class RunningMoments:
    """Running mean and standard deviation of every score seen (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, total: float, total_sq: float, n: int) -> None:
        mean = total / n
        var = total_sq / n - mean * mean
        delta, count = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta * delta * self.count * n / count) / count
        self.mean += delta * n / count
        self.count = count


# ---------------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One rollout batch, ``[B, P + R]`` ids and ``[B, R]`` per-response-token tensors."""
    ids: Tensor
    mask: Tensor
    old_logp: Tensor
    ref_logp: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor


class PPOTrainer:
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

    def __init__(self, policy, reward_model, config: PPOConfig, *, impl: str = "fused"):
        self.cfg = config
        self.ops = Ops(impl)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.policy = disable_dropout(as_causal_lm(policy))
        self.device = next(self.policy.parameters()).device
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.critic = disable_dropout(copy.deepcopy(reward_model)).requires_grad_(True)
        freeze_unread_lm_head(self.critic)
        self.reward_model = disable_dropout(reward_model).requires_grad_(False)
        self.policy_train, self.critic_train = self.policy, self.critic
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.policy_train, self.critic_train = DDP(self.policy), DDP(self.critic)
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in self.policy.parameters() if p.requires_grad]},
            {"params": [p for p in self.critic.parameters() if p.requires_grad], "lr": config.critic_lr or config.lr},
        ], lr=config.lr, weight_decay=0.0)
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.generator = torch.Generator(self.device).manual_seed(config.seed + self.rank)
        self.step_count = 0

    # -- one step ------------------------------------------------------------------------------------

    def step(self, prompts: Tensor, responses: Tensor | None = None) -> dict[str, float]:
        """One PPO step on this rank's ``prompts`` (``[B, P]`` int64). ``responses`` (``[B, R]``, right
        padded, ``R = max_new_tokens``) skips sampling, for tests and offline data. Returns the metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if responses is None:
            responses, mask = self.sample(prompts)
        else:
            checks.shape("responses", responses, (prompts.shape[0], cfg.max_new_tokens))
            mask = response_mask(responses, cfg.eos_id)
        experience, metrics = self._experience(prompts, responses, mask)
        metrics.update(self._update(experience))
        metrics["kl_coef"] = self.kl.value
        self.kl.update(metrics["kl"], prompts.shape[0] * self.world)
        self.step_count += 1
        seconds = time.perf_counter() - start
        metrics["tokens_per_s"] = metrics["response_length"] * prompts.shape[0] * self.world / seconds
        metrics["peak_memory_mib"] = _peak_memory_mib(self.device)
        return metrics

    def sample(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Responses ``[B, max_new_tokens]`` and their mask, sampled from the policy with this trainer's RNG."""
        cfg = self.cfg
        return generate(self.policy, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                        temperature=cfg.temperature, top_k=cfg.top_k, generator=self.generator)

    @torch.no_grad()
    def _experience(self, prompts: Tensor, responses: Tensor, mask: Tensor) -> tuple[Experience, dict]:
        cfg, P = self.cfg, prompts.shape[1]
        ids = torch.cat([prompts, responses], dim=1)
        old_logp = self.response_logprobs(self.policy, ids, mask, P)
        ref_logp = self.response_logprobs(self.ref_policy, ids, mask, P)
        values = self.critic(ids)[:, P - 1:-1]
        last = mask.sum(1) - 1  # the EOS, or the last token of a response cut at max_new_tokens
        raw_scores = self.reward_model(ids).gather(1, (P + last)[:, None])[:, 0]
        has_eos = responses.gather(1, last[:, None])[:, 0] == cfg.eos_id
        scores = raw_scores
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos)
        if cfg.reward_norm:
            total, total_sq = self._all_sum(torch.stack([scores.sum(), scores.square().sum()]).double()).tolist()
            self.score_moments.update(total, total_sq, scores.numel() * self.world)
            scores = (scores - self.score_moments.mean) / (self.score_moments.var ** 0.5 + 1e-8)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        kl = torch.where(mask, kl_estimate(old_logp, ref_logp, cfg.kl_estimator), 0.0)
        rewards = torch.zeros_like(kl) if cfg.kl_in_loss else -self.kl.value * kl
        rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
        advantages, returns = self.ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = self._whiten(advantages, mask)
        metrics = self._global_means({
            "score": raw_scores, "kl": kl.sum(1), "response_length": mask.sum(1).float(), "eos_share": has_eos.float(),
        })
        metrics["explained_variance"] = self._explained_variance(values, returns, mask)
        return Experience(ids, mask, old_logp, ref_logp, values, advantages, returns), metrics

    def _update(self, exp: Experience) -> dict[str, float]:
        cfg = self.cfg
        B = exp.ids.shape[0]
        if B % cfg.num_minibatches:
            raise ValueError(f"num_minibatches: expected a divisor of the batch size {B}, got {cfg.num_minibatches}")
        minibatch = B // cfg.num_minibatches
        micro = cfg.micro_batch_size or minibatch
        totals, updates, stop = torch.zeros(len(STATS) + 1, dtype=torch.float64), 0, False
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.generator, device=self.device)
            for rows in order.split(minibatch):
                tokens, sequences = self._all_sum(
                    torch.tensor([exp.mask[rows].sum().item(), len(rows)], dtype=torch.float64)).tolist()
                self.optimizer.zero_grad(set_to_none=True)
                sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)
                for part in rows.split(micro):
                    loss, part_sums = self._loss(exp, part, tokens, sequences)
                    (loss * self.world).backward()  # DDP averages gradients over ranks; the loss is a global sum
                    sums += part_sums
                if cfg.max_grad_norm is not None:
                    for group in self.optimizer.param_groups:  # policy, then critic
                        torch.nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
                self.optimizer.step()
                sums = self._all_sum(sums)
                totals += sums
                updates += 1
                # the same global value on every rank, so all ranks stop together
                stop = cfg.target_kl is not None and sums[STATS.index("approx_kl")] / sums[-1] > cfg.target_kl
                if stop:
                    break
            if stop:
                break
        means = (totals[:-1] / totals[-1]).tolist()
        return {**dict(zip(STATS, means)), "updates": updates}

    def _loss(self, exp: Experience, rows: Tensor, tokens: float, sequences: float) -> tuple[Tensor, Tensor]:
        """The micro-batch ``rows``' share of the minibatch loss, and its per-token sums of ``STATS``."""
        cfg, P = self.cfg, exp.ids.shape[1] - exp.mask.shape[1]
        ids, mask = exp.ids[rows], exp.mask[rows]
        old_logp, advantages = exp.old_logp[rows], exp.advantages[rows]
        logp, entropy = self.response_logprobs(self.policy_train, ids, mask, P, entropy=True)
        values = self.critic_train(ids)[:, P - 1:-1]
        pg = policy_loss(logp, old_logp, advantages, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
        vf, vf_clipped = value_loss(values, exp.values[rows], exp.returns[rows], cfg.value_clip)

        def agg(x):
            return aggregate(x, mask, cfg.loss_agg, tokens=tokens, sequences=sequences, horizon=cfg.max_new_tokens)

        loss = agg(pg) + cfg.vf_coef * agg(vf) - cfg.ent_coef * agg(entropy)
        if cfg.kl_in_loss:
            loss = loss + self.kl.value * agg(kl_estimate(logp, exp.ref_logp[rows], cfg.kl_estimator))
        with torch.no_grad():
            log_ratio = logp - old_logp
            ratio = log_ratio.exp()
            per_token = {
                "policy_loss": pg, "value_loss": vf, "entropy": entropy,
                "approx_kl": ratio - 1 - log_ratio, "old_approx_kl": -log_ratio,
                "clipfrac_upper": (ratio > 1 + cfg.clip_high) & (advantages > 0),
                "clipfrac_lower": (ratio < 1 - cfg.clip_low) & (advantages < 0),
                "vf_clipfrac": vf_clipped,
            }
            sums = [torch.where(mask, per_token[k].double(), 0.0).sum() for k in STATS] + [mask.sum().double()]
        return loss, torch.stack(sums).cpu()

    # -- helpers ---------------------------------------------------------------------------------------

    def response_logprobs(self, model, ids: Tensor, mask: Tensor, P: int, entropy: bool = False):
        """``[B, R]`` fp32 log-probs (and entropies) of the response tokens ``ids[:, P:]`` under ``model``
        (the policy, the reference, or a DDP wrapper of either) at the sampling temperature; 0 where
        ``mask`` (``[B, R]`` bool) is false."""
        hidden = model(ids)[:, P - 1:-1]
        labels = ids[:, P:].masked_fill(~mask, IGNORE)
        weight = getattr(model, "module", model).output_weight
        return self.ops.linear_logprobs(hidden, weight, labels, temperature=self.cfg.temperature,
                                        ignore_index=IGNORE, return_entropy=entropy)

    def _whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """``masked_whiten`` with the statistics of the global batch (all ranks' rows, equal counts)."""
        if self.world == 1:
            return self.ops.masked_whiten(x, mask)
        xs = [torch.empty_like(x) for _ in range(self.world)]
        masks = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(xs, x.contiguous())
        dist.all_gather(masks, mask.to(torch.uint8))
        return self.ops.masked_whiten(torch.cat(xs), torch.cat(masks).bool()).chunk(self.world)[self.rank]

    def _all_sum(self, x: Tensor) -> Tensor:
        if self.distributed:
            x = x.to(self.device)
            dist.all_reduce(x)
        return x.cpu()

    def _global_means(self, rows: dict[str, Tensor]) -> dict[str, float]:
        sums = self._all_sum(torch.stack([v.double().sum() for v in rows.values()]))
        n = next(iter(rows.values())).numel() * self.world
        return dict(zip(rows, (sums / n).tolist()))

    def _explained_variance(self, values: Tensor, returns: Tensor, mask: Tensor) -> float:
        """``1 - Var(returns - values) / Var(returns)`` over the valid tokens of the global batch."""
        r, d = returns[mask].double(), (returns - values)[mask].double()
        n, sr, sr2, sd, sd2 = self._all_sum(torch.stack([
            r.new_tensor(float(r.numel())), r.sum(), r.square().sum(), d.sum(), d.square().sum()])).tolist()
        var_r = sr2 / n - (sr / n) ** 2
        return float("nan") if var_r <= 0 else 1.0 - (sd2 / n - (sd / n) ** 2) / var_r

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Writes the run's state (policy, critic, optimiser, KL coefficient, score moments, every rank's
        sampling RNG, torch's global RNG, step) to ``path`` from rank 0, atomically."""
        generators = [self.generator.get_state()]
        if self.distributed:
            generators = [None] * self.world
            dist.all_gather_object(generators, self.generator.get_state())
        state = {
            "kind": "ppo", "config": dataclasses.asdict(self.cfg), "world_size": self.world, "step": self.step_count,
            "policy": self.policy.state_dict(), "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(), "kl_coef": self.kl.value,
            "score_moments": [self.score_moments.mean, self.score_moments.var, self.score_moments.count],
            "generators": generators, "torch_rng": torch.get_rng_state(),
        }
        if self.rank == 0:
            checkpoint.save(path, state)
        if self.distributed:
            dist.barrier()

    def load(self, path) -> None:
        """Restores a state written by ``save``. Raises ``CheckpointError`` (changing nothing) when the
        file is corrupt, or was written by a run with another config, world size or model shape."""
        state = checkpoint.load(path, "ppo")
        differences = checkpoint.mismatches(state["config"], dataclasses.asdict(self.cfg))
        if state["world_size"] != self.world:
            differences.append(f"world_size: saved {state['world_size']}, now {self.world}")
        if differences:
            raise checkpoint.CheckpointError(f"{path}: written by a different run: " + "; ".join(differences))
        checkpoint.check_module(self.policy, state["policy"], "policy", path)
        checkpoint.check_module(self.critic, state["critic"], "critic", path)
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.value = state["kl_coef"]
        self.score_moments.mean, self.score_moments.var, self.score_moments.count = state["score_moments"]
        self.generator.set_state(state["generators"][self.rank])
        torch.set_rng_state(state["torch_rng"])
        self.step_count = state["step"]


STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac_upper", "clipfrac_lower",
         "vf_clipfrac")


def _peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
