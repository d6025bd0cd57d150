"""What PPO (``fastrlhf/ppo.py``) and GRPO (``fastrlhf/grpo.py``) share, so each of those files holds only
its algorithm: the policy and its frozen reference, DistributedDataParallel, rollout, reward-model
scoring, the clipped policy loss from the policy's last hidden states, the epoch / minibatch /
micro-batch update loop, global reductions and checkpoints.

Every loss is a sum over the tokens of a micro-batch divided by a normaliser counted over the whole
minibatch on all ranks, so gradient accumulation and DistributedDataParallel give the update of one big
batch (a mean of per-micro-batch means would not). Under ``torchrun`` each rank rolls out its own
prompts; gradients are all-reduced by DDP, and score normalisation, batch statistics and metrics use
global statistics.
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
from fastrlhf.models import as_causal_lm, disable_dropout
from fastrlhf.sampling import generate, response_mask

LOSS_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                     "seq-mean-token-sum-norm")
IGNORE = -100
# linear_policy_loss's metrics that are aggregated like the loss (they add across micro-batches and ranks
# as it does), and those that are token means over one call (weighted by its share of the tokens here)
AGGREGATED = {"policy_loss": "policy_loss", "kl": "kl_loss", "entropy": "entropy"}
TOKEN_MEANS = ("approx_kl", "ppo_kl", "clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean")


@dataclass
class RLConfig:
    """The settings PPO and GRPO share; ``PPOConfig`` and ``GRPOConfig`` add their own."""
    # rollout
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    eos_id: int = 1
    pad_id: int = 0
    # reward-model score
    missing_eos_penalty: float | None = None  # subtracted from the score of a response without EOS
    reward_norm: bool = False  # scores standardised by the running mean and std of all scores so far
    reward_clip: float | None = None  # scores clipped to +-reward_clip (after normalisation)
    # update
    ppo_epochs: int = 4
    num_minibatches: int = 1
    micro_batch_size: int | None = None  # gradient accumulation inside a minibatch
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # c > 1: for A < 0 the loss is at most -c A
    ent_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    target_kl: float | None = None  # stop this step's epochs once approx_kl (k3) exceeds it
    loss_agg: str = "token-mean"
    lr: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        checks.one_of("loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        if self.eos_id == self.pad_id:
            raise ValueError(f"eos_id and pad_id: expected distinct tokens, got {self.eos_id} for both")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip: expected a value > 1, got {self.dual_clip}")


@dataclass
class Experience:
    """One rollout batch, ``[B, P + R]`` ids and ``[B, R]`` per-response-token tensors: what the policy
    loss reads (PPO's adds the critic's values and the returns)."""
    ids: Tensor
    mask: Tensor
    old_logp: Tensor
    ref_logp: Tensor
    advantages: Tensor


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


class PolicyTrainer:
    """The base of ``PPOTrainer`` and ``GRPOTrainer``; see theirs for the arguments.

    A subclass sets ``KIND`` (the checkpoint's kind), builds ``self.optimizer``, adds any other trained
    module to ``self.models`` (saved and restored by name), and implements ``_loss`` for ``_update``.
    """

    KIND = ""

    def __init__(self, policy, reward_model, config: RLConfig, impl: str):
        self.cfg = config
        self.ops = Ops(impl)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.policy = disable_dropout(as_causal_lm(policy))
        self.device = next(self.policy.parameters()).device
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.reward_model = disable_dropout(reward_model).requires_grad_(False)
        self.policy_train = self._ddp(self.policy)
        self.models = {"policy": self.policy}
        self.score_moments = RunningMoments()
        self.generator = torch.Generator(self.device).manual_seed(config.seed + self.rank)
        self.step_count = 0

    def _ddp(self, module):
        """``module`` wrapped for training: in DDP under ``torch.distributed``, else as it is."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module)

    # -- rollout and scoring ---------------------------------------------------------------------------

    def sample(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Responses ``[B, max_new_tokens]`` and their mask, sampled from the policy with this trainer's RNG."""
        cfg = self.cfg
        return generate(self.policy, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                        temperature=cfg.temperature, top_k=cfg.top_k, generator=self.generator)

    def _rollout(self, prompts: Tensor, responses: Tensor | None) -> tuple[Tensor, Tensor]:
        """Sampled responses and their mask, or the given ``responses`` (checked) and theirs."""
        if responses is None:
            return self.sample(prompts)
        checks.shape("responses", responses, (prompts.shape[0], self.cfg.max_new_tokens))
        return responses, response_mask(responses, self.cfg.eos_id)

    def score(self, ids: Tensor, mask: Tensor, P: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The reward model's ``[B]`` scores of ``ids`` (``[B, P + R]``, response mask ``[B, R]``) at the
        last response token (the EOS, or the last token of a response cut at ``max_new_tokens``; never
        the pad after it). Returns ``(raw, scores, has_eos, last)``: ``scores`` is ``raw`` less
        ``missing_eos_penalty`` where there is no EOS, then normalised (``reward_norm``, global running
        statistics) and clipped (``reward_clip``); ``last`` indexes the last response token."""
        cfg = self.cfg
        last = mask.sum(1) - 1
        raw = self.reward_model(ids).gather(1, (P + last)[:, None])[:, 0]
        has_eos = ids[:, P:].gather(1, last[:, None])[:, 0] == cfg.eos_id
        scores = raw
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos)
        if cfg.reward_norm:
            total, total_sq = self._all_sum(torch.stack([scores.sum(), scores.square().sum()]).double()).tolist()
            self.score_moments.update(total, total_sq, scores.numel() * self.world)
            scores = (scores - self.score_moments.mean) / (self.score_moments.var ** 0.5 + 1e-8)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return raw, scores, has_eos, last

    def response_logprobs(self, model, ids: Tensor, mask: Tensor, P: int, entropy: bool = False):
        """``[B, R]`` fp32 log-probs (and entropies) of the response tokens ``ids[:, P:]`` under ``model``
        (the policy, the reference, or a DDP wrapper of either) at the sampling temperature; 0 where
        ``mask`` (``[B, R]`` bool) is false."""
        hidden = model(ids)[:, P - 1:-1]
        labels = ids[:, P:].masked_fill(~mask, IGNORE)
        weight = getattr(model, "module", model).output_weight
        return self.ops.linear_logprobs(hidden, weight, labels, temperature=self.cfg.temperature,
                                        ignore_index=IGNORE, return_entropy=entropy)

    # -- the update ------------------------------------------------------------------------------------

    def _update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes over ``num_minibatches`` shuffled minibatches of the experience ``exp``
        (``exp.mask`` ``[B, R]``), each split into ``micro_batch_size`` accumulation steps; gradient
        clipping per parameter group; the ``target_kl`` stop. Returns each metric's mean over the updates,
        and ``updates``."""
        cfg = self.cfg
        B = exp.mask.shape[0]
        if B % cfg.num_minibatches:
            raise ValueError(f"num_minibatches: expected a divisor of the batch size {B}, got {cfg.num_minibatches}")
        minibatch = B // cfg.num_minibatches
        micro = cfg.micro_batch_size or minibatch
        totals, updates, stop = {}, 0, False
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.generator, device=self.device)
            for rows in order.split(minibatch):
                tokens, sequences = self._all_sum(
                    torch.tensor([exp.mask[rows].sum().item(), len(rows)], dtype=torch.float64)).tolist()
                self.optimizer.zero_grad(set_to_none=True)
                shares = {}
                for part in rows.split(micro):
                    loss, part_shares = self._loss(exp, part, tokens, sequences)
                    (loss * self.world).backward()  # DDP averages gradients over ranks; the loss is a global sum
                    shares = {k: shares.get(k, 0.0) + v.double() for k, v in part_shares.items()}
                if cfg.max_grad_norm is not None:
                    for group in self.optimizer.param_groups:  # e.g. the policy, then PPO's critic
                        torch.nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
                self.optimizer.step()
                # every rank sees the same global values, so all ranks stop together
                minibatch_metrics = dict(zip(shares, self._all_sum(torch.stack(list(shares.values()))).tolist()))
                totals = {k: totals.get(k, 0.0) + v for k, v in minibatch_metrics.items()}
                updates += 1
                stop = cfg.target_kl is not None and minibatch_metrics["approx_kl"] > cfg.target_kl
                if stop:
                    break
            if stop:
                break
        return {**{k: v / updates for k, v in totals.items()}, "updates": updates}

    def _loss(self, exp: Experience, rows: Tensor, tokens: float, sequences: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch ``rows``' share of the minibatch loss (``tokens`` and ``sequences`` count the
        minibatch on all ranks), and its shares of the metrics (0-d tensors that add up, over the
        micro-batches and ranks, to the minibatch's values)."""
        raise NotImplementedError

    def _policy_loss(self, exp: Experience, rows: Tensor, tokens: float, sequences: float, **options) -> tuple[Tensor, dict]:
        """``linear_policy_loss`` of the micro-batch ``rows`` from the policy's last hidden states and LM
        head (the logits never exist), with this config's clipping, entropy bonus and aggregation over the
        global counts; ``options`` add the algorithm's own (loss type, KL term). Returns the loss and its
        metric shares (see ``_loss``)."""
        cfg = self.cfg
        ids, mask = exp.ids[rows], exp.mask[rows]
        P = ids.shape[1] - mask.shape[1]
        hidden = self.policy_train(ids)[:, P - 1:-1]
        labels = ids[:, P:].masked_fill(~mask, IGNORE)
        loss, metrics = self.ops.linear_policy_loss(
            hidden, self.policy.output_weight, labels, exp.old_logp[rows], exp.advantages[rows], mask,
            temperature=cfg.temperature, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
            entropy_coef=cfg.ent_coef, aggregation=cfg.loss_agg, num_tokens=tokens, num_sequences=sequences,
            horizon=cfg.max_new_tokens, **options)
        share = mask.sum() / tokens
        shares = {name: metrics[key] for key, name in AGGREGATED.items()}
        shares.update({k: metrics[k] * share for k in TOKEN_MEANS})
        return loss, shares

    # -- global statistics -----------------------------------------------------------------------------

    def _global_rows(self, fn, *tensors: Tensor) -> Tensor:
        """``fn`` of the rows of every rank stacked in rank order (all ranks hold the same number of rows),
        and this rank's rows of its result: batch statistics (whitening, group advantages) of the global
        batch."""
        if self.world == 1:
            return fn(*tensors)
        gathered = []
        for t in tensors:
            sent = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()  # gloo has no bool
            parts = [torch.empty_like(sent) for _ in range(self.world)]
            dist.all_gather(parts, sent)
            gathered.append(torch.cat(parts).to(t.dtype))
        return fn(*gathered).chunk(self.world)[self.rank]

    def _all_sum(self, x: Tensor) -> Tensor:
        if self.distributed:
            x = x.to(self.device)
            dist.all_reduce(x)
        return x.cpu()

    def _global_means(self, rows: dict[str, Tensor]) -> dict[str, float]:
        sums = self._all_sum(torch.stack([v.double().sum() for v in rows.values()]))
        n = next(iter(rows.values())).numel() * self.world
        return dict(zip(rows, (sums / n).tolist()))

    def _start(self) -> float:
        """Starts a step's clock and peak-memory count."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _finish(self, metrics: dict, start: float, sequences: int) -> dict:
        """Counts the step, adds throughput (``tokens_per_s`` over the global batch) and peak memory."""
        self.step_count += 1
        seconds = time.perf_counter() - start
        metrics["tokens_per_s"] = metrics["response_length"] * sequences * self.world / seconds
        metrics["peak_memory_mib"] = _peak_memory_mib(self.device)
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------------

    def _extra_state(self) -> dict:
        """The subclass's own state beyond ``self.models`` and the optimiser (saved by ``save``)."""
        return {}

    def _restore_extra_state(self, state: dict) -> None:
        pass

    def save(self, path) -> None:
        """Writes the run's state (every model in ``self.models``, optimiser, score moments, every rank's
        sampling RNG, torch's global RNG, step, and the subclass's own state) to ``path`` from rank 0,
        atomically."""
        generators = [self.generator.get_state()]
        if self.distributed:
            generators = [None] * self.world
            dist.all_gather_object(generators, self.generator.get_state())
        state = {
            "kind": self.KIND, "config": dataclasses.asdict(self.cfg), "world_size": self.world,
            "step": self.step_count, **{name: m.state_dict() for name, m in self.models.items()},
            "optimizer": self.optimizer.state_dict(),
            "score_moments": [self.score_moments.mean, self.score_moments.var, self.score_moments.count],
            "generators": generators, "torch_rng": torch.get_rng_state(), **self._extra_state(),
        }
        if self.rank == 0:
            checkpoint.save(path, state)
        if self.distributed:
            dist.barrier()

    def load(self, path) -> None:
        """Restores a state written by ``save``. Raises ``CheckpointError`` (changing nothing) when the
        file is corrupt, or was written by a run with another config, world size or model shape."""
        state = checkpoint.load(path, self.KIND)
        differences = checkpoint.mismatches(state["config"], dataclasses.asdict(self.cfg))
        if state["world_size"] != self.world:
            differences.append(f"world_size: saved {state['world_size']}, now {self.world}")
        if differences:
            raise checkpoint.CheckpointError(f"{path}: written by a different run: " + "; ".join(differences))
        for name, module in self.models.items():
            checkpoint.check_module(module, state[name], name, path)
        for name, module in self.models.items():
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.score_moments.mean, self.score_moments.var, self.score_moments.count = state["score_moments"]
        self.generator.set_state(state["generators"][self.rank])
        torch.set_rng_state(state["torch_rng"])
        self.step_count = state["step"]
        self._restore_extra_state(state)


def _peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
