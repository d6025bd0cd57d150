"""``fastrlhf demo``: RLHF end to end on a synthetic task, in a couple of minutes on a laptop CPU.

The task. Tokens are ``PAD = 0``, ``EOS = 1`` and the digits 0..9 (tokens 2..11). A prompt is
``PROMPT_LEN`` random digits; a response is digits ended by EOS. The hidden scorer, which only the demo
sees, rates a response by the share of its digits that are larger than the digit just before them (the
first digit is compared with the prompt's last): ``9 2 | 3 5 4 EOS`` scores 2/3. A response with no
digit, or without EOS (cut at the length limit), scores 0. Uniformly random digits score about 0.45;
strictly ascending ones score 1.

The stages:

1. pre-train ``TinyGPT`` on prompts followed by random responses (random digits, random length), so it
   samples varied responses (negative log-likelihood from ``linear_logprobs``);
2. train a reward model (the pre-trained backbone plus a scalar head) on pairs of random responses to
   the same prompt, some of them cut before their EOS, the one the hidden scorer rates higher being
   chosen (ties dropped); report its accuracy on held-out pairs. (Without cut responses among the
   pairs, the reward model has never seen a response without EOS and may rate them highly, and PPO
   learns to never stop: reward hacking.)
3. run PPO (``--algo ppo``, the default) or GRPO (``--algo grpo``: ``GRPO_N`` responses to each of a
   quarter as many prompts, the same number of responses per step) against the learned reward model
   (never the hidden scorer);
4. report the hidden scorer's mean on a fixed set of evaluation prompts before and after RL, and the
   KL from the trained policy to the reference (pre-trained) policy on those responses.

``--impl both`` runs the whole demo twice with the same seed, fused ops then the reference ops, and the
final table shows the two side by side, timings included.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from fastrlhf.grpo import GRPOConfig, GRPOTrainer
from fastrlhf.impl import Ops
from fastrlhf.models import TinyGPT, TinyGPTConfig, ValueModel
from fastrlhf.ppo import PPOConfig, PPOTrainer
from fastrlhf.rm import PreferenceBatch, RewardConfig, RewardTrainer
from fastrlhf.sampling import generate, response_mask

PAD, EOS, FIRST_DIGIT, DIGITS = 0, 1, 2, 10
VOCAB = FIRST_DIGIT + DIGITS
PROMPT_LEN = 4
GRPO_N = 4  # GRPO's responses per prompt


@dataclass
class Settings:
    response_len: int = 6  # max new tokens: up to 5 digits and EOS
    d_model: int = 64
    n_layer: int = 2
    pretrain_steps: int = 300
    rm_pairs: int = 32768
    rm_steps: int = 1500
    rm_lr: float = 2e-3  # decays linearly to 0
    rl_steps: int = 120
    batch_size: int = 64  # responses per RL step
    eval_prompts: int = 512


QUICK = Settings(pretrain_steps=150, rm_pairs=16384, rm_steps=800, rl_steps=40)


# -- the task --------------------------------------------------------------------------------------


def hidden_score(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """``[B]`` float in [0, 1]: the share of each response's digits that exceed the digit before them;
    0 for a response without EOS."""
    digits = response_mask(responses, EOS) & (responses != EOS) & (responses != PAD)
    finished = (responses == EOS).any(1)
    before = torch.cat([prompts[:, -1:], responses[:, :-1]], dim=1)
    rises = (responses > before) & digits
    count = digits.sum(1)
    return torch.where(finished & (count > 0), rises.sum(1) / count.clamp(min=1), 0.0)


def random_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(FIRST_DIGIT, VOCAB, (n, PROMPT_LEN), generator=generator)


def random_responses(n: int, length: int, generator: torch.Generator, cut: bool = False) -> torch.Tensor:
    """``[n, length]``: 1 to ``length - 1`` uniform digits, EOS, then PAD; with ``cut``, also (one time
    in ``length``) ``length`` digits and no EOS."""
    digits = torch.randint(FIRST_DIGIT, VOCAB, (n, length), generator=generator)
    stop = torch.randint(1, length + cut, (n, 1), generator=generator)
    position = torch.arange(length)[None]
    return torch.where(position < stop, digits, torch.where(position == stop, EOS, PAD))


# -- the stages ------------------------------------------------------------------------------------


def pretrain(policy: TinyGPT, s: Settings, ops: Ops, generator, progress, log) -> None:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    task = progress.add_task("pre-train policy", total=s.pretrain_steps)
    for step in range(s.pretrain_steps):
        prompts = random_prompts(s.batch_size, generator)
        responses = random_responses(s.batch_size, s.response_len, generator)
        ids = torch.cat([prompts, responses], 1)
        labels = responses.masked_fill(~response_mask(responses, EOS), -100)
        logp = ops.linear_logprobs(policy(ids)[:, PROMPT_LEN - 1:-1], policy.output_weight, labels)
        loss = -logp.sum() / (labels != -100).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log({"stage": "pretrain", "step": step, "nll": loss.item()})
        progress.advance(task)


def preference_pairs(n: int, s: Settings, generator) -> PreferenceBatch:
    prompts = random_prompts(n, generator)
    a, b = (random_responses(n, s.response_len, generator, cut=True) for _ in range(2))
    score_a, score_b = hidden_score(prompts, a), hidden_score(prompts, b)
    keep = score_a != score_b
    a_wins = (score_a > score_b)[:, None]
    prompts, chosen, rejected = prompts[keep], torch.where(a_wins, a, b)[keep], torch.where(a_wins, b, a)[keep]
    prompt_mask = torch.ones_like(prompts, dtype=torch.bool)
    return PreferenceBatch(torch.cat([prompts, chosen], 1), torch.cat([prompt_mask, response_mask(chosen, EOS)], 1),
                           torch.cat([prompts, rejected], 1), torch.cat([prompt_mask, response_mask(rejected, EOS)], 1))


def train_reward_model(rm: ValueModel, s: Settings, impl: str, generator, progress, log) -> list[tuple[int, float]]:
    """Trains ``rm``; returns (step, held-out accuracy) at each evaluation."""
    train, heldout = preference_pairs(s.rm_pairs, s, generator), preference_pairs(1024, s, generator)
    trainer = RewardTrainer(rm, RewardConfig(lr=s.rm_lr), impl=impl)
    schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1 - step / s.rm_steps)
    task = progress.add_task("train reward model", total=s.rm_steps)
    curve = []
    for step in range(s.rm_steps):
        rows = torch.randint(0, train.chosen_ids.shape[0], (s.batch_size,), generator=generator)
        stats = trainer.train_step(train.rows(rows))
        schedule.step()
        if (step + 1) % max(1, s.rm_steps // 8) == 0 or step == s.rm_steps - 1:
            accuracy = trainer.evaluate(heldout)["accuracy"]
            curve.append((step + 1, accuracy))
            log({"stage": "rm", "step": step, **stats, "heldout_accuracy": accuracy})
        progress.advance(task)
    return curve


def rl_trainer(algo: str, policy, rm, s: Settings, impl: str, seed: int):
    """The demo's PPO or GRPO trainer, and its prompts per step (``s.batch_size`` responses either way)."""
    common = {"max_new_tokens": s.response_len, "eos_id": EOS, "pad_id": PAD, "lr": 1e-4, "ppo_epochs": 4,
              "num_minibatches": 2, "missing_eos_penalty": 1.0, "seed": seed}
    if algo == "ppo":
        config = PPOConfig(critic_lr=1e-3, kl_coef=0.02, ent_coef=0.0, **common)
        return PPOTrainer(policy, rm, config, impl=impl), s.batch_size
    config = GRPOConfig(n=GRPO_N, kl_coef=0.1, **common)  # k3 in the loss; 0.02 let the policy drift to long responses
    return GRPOTrainer(policy, rm, config, impl=impl), s.batch_size // GRPO_N


@torch.no_grad()
def evaluate_policy(trainer, prompts: torch.Tensor, seed: int) -> tuple[float, float]:
    """Mean hidden score of sampled responses, and mean per-sequence KL(policy || reference) (k1)."""
    cfg = trainer.cfg
    responses, mask = generate(trainer.policy, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=EOS, pad_id=PAD,
                               temperature=cfg.temperature, generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([prompts, responses], 1)
    logp = trainer.response_logprobs(trainer.policy, ids, mask, PROMPT_LEN)
    ref_logp = trainer.response_logprobs(trainer.ref_policy, ids, mask, PROMPT_LEN)
    return hidden_score(prompts, responses).mean().item(), (logp - ref_logp).sum(1).mean().item()


def run(s: Settings, algo: str, impl: str, seed: int, progress, log) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model_cfg = TinyGPTConfig(vocab_size=VOCAB, n_layer=s.n_layer, n_head=4, d_model=s.d_model,
                              max_len=PROMPT_LEN + s.response_len)
    policy = TinyGPT(model_cfg)
    pretrain(policy, s, Ops(impl), generator, progress, log)
    seconds = {"pretrain": time.perf_counter() - start}

    rm = ValueModel(copy.deepcopy(policy))
    rm_curve = train_reward_model(rm, s, impl, generator, progress, log)
    seconds["reward_model"] = time.perf_counter() - start - sum(seconds.values())

    trainer, n_prompts = rl_trainer(algo, policy, rm, s, impl, seed)
    eval_prompts = random_prompts(s.eval_prompts, generator)
    score_before, _ = evaluate_policy(trainer, eval_prompts, seed)
    name = f"{algo.upper()} ({impl})"
    task = progress.add_task(name, total=s.rl_steps)
    rl_curve = []
    for step in range(s.rl_steps):
        prompts = random_prompts(n_prompts, generator)
        rollout_prompts = prompts.repeat_interleave(s.batch_size // n_prompts, dim=0)  # a row per response
        responses, _ = trainer.sample(rollout_prompts)
        metrics = trainer.step(prompts, responses)
        metrics["hidden_score"] = hidden_score(rollout_prompts, responses).mean().item()
        rl_curve.append({"step": step + 1, **metrics})
        log({"stage": algo, "step": step, **metrics})
        progress.update(task, advance=1, description=f"{name} hidden score {metrics['hidden_score']:.2f}")
    seconds[algo] = time.perf_counter() - start - sum(seconds.values())
    score_after, kl = evaluate_policy(trainer, eval_prompts, seed)
    return {
        "algo": algo, "impl": impl, "hidden_score_before": score_before, "hidden_score_after": score_after,
        "rm_heldout_accuracy": rm_curve[-1][1], "kl_to_reference": kl, "seconds": time.perf_counter() - start,
        "stage_seconds": seconds, "settings": asdict(s), "seed": seed,
        "rm_curve": rm_curve, "rl_curve": rl_curve,
    }


# -- reporting -------------------------------------------------------------------------------------


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    rm_axis = axes[0].twinx()  # the reward model's scale is its own
    for r in results:
        steps = [m["step"] for m in r["rl_curve"]]
        axes[0].plot(steps, [m["hidden_score"] for m in r["rl_curve"]], label=f"hidden score ({r['impl']})")
        rm_axis.plot(steps, [m["score"] for m in r["rl_curve"]], ":", label=f"reward model ({r['impl']}, right)")
        axes[1].plot(steps, [m["kl"] for m in r["rl_curve"]], label=r["impl"])
        axes[2].plot(*zip(*r["rm_curve"]), marker="o", label=r["impl"])
    step = f"{results[0]['algo'].upper()} step"
    for ax, title, xlabel in zip(axes, ["score of the rollouts", "KL to reference (per sequence)",
                                        "reward model held-out accuracy"], [step, step, "RM step"]):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(loc="upper left")
    rm_axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[dict]):
    from rich.table import Table

    t = Table(title=f"fastrlhf demo ({results[0]['algo'].upper()})")
    t.add_column("")
    for r in results:
        t.add_column(r["impl"], justify="right")
    rows = [("hidden score before RL", "hidden_score_before", "{:.3f}"),
            ("hidden score after RL", "hidden_score_after", "{:.3f}"),
            ("reward model held-out accuracy", "rm_heldout_accuracy", "{:.3f}"),
            ("KL to reference (per sequence)", "kl_to_reference", "{:.3f}"),
            ("seconds, total", "seconds", "{:.1f}")]
    for label, key, fmt in rows:
        t.add_row(label, *(fmt.format(r[key]) for r in results))
    for stage in results[0]["stage_seconds"]:
        t.add_row(f"seconds, {stage}", *(f"{r['stage_seconds'][stage]:.1f}" for r in results))
    return t


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    impls = ["fused", "reference"] if args.impl == "both" else [args.impl]
    out = args.out
    if out:
        os.makedirs(out, exist_ok=True)
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "w") if out else None
    results = []
    try:
        with Progress(transient=False) as progress:
            for impl in impls:
                def log(record, impl=impl):
                    if metrics_file:
                        metrics_file.write(json.dumps({"impl": impl, **record}) + "\n")

                results.append(run(settings, args.algo, impl, args.seed, progress, log))
    finally:
        if metrics_file:
            metrics_file.close()
    Console().print(table(results))
    if out:
        figures = [{k: v for k, v in r.items() if k not in ("rm_curve", "rl_curve")} for r in results]
        summary = {**figures[0], "impl": args.impl, "runs": {f["impl"]: f for f in figures}}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot(results, os.path.join(out, "demo.png"))
    return 0
