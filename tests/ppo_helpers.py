"""Tiny models, a fixed batch and the DDP worker shared by tests/test_ppo.py (imported by name, also in
the worker processes that torch.multiprocessing spawns)."""

import os

import torch

from fastrlhf.models import TinyGPT, TinyGPTConfig, ValueModel
from fastrlhf.ppo import PPOConfig, PPOTrainer

EOS, PAD, P, R = 1, 0, 3, 5


def models(seed=0, d_model=16):
    torch.manual_seed(seed)
    cfg = TinyGPTConfig(vocab_size=8, n_layer=1, n_head=2, d_model=d_model, max_len=P + R)
    return TinyGPT(cfg), ValueModel(TinyGPT(cfg))


def config(**overrides):
    return PPOConfig(**{"max_new_tokens": R, "eos_id": EOS, "pad_id": PAD, "lr": 1e-2, "ppo_epochs": 2,
                        "kl_coef": 0.1, "missing_eos_penalty": 0.5, **overrides})


def trainer(impl="fused", seed=0, d_model=16, sgd=False, **overrides):
    """A trainer on fresh tiny models; ``sgd``: plain SGD, whose update is proportional to the gradient
    (Adam's first step is about lr * sign(grad), which turns rounding noise in tiny gradients into lr)."""
    t = PPOTrainer(*models(seed, d_model), config(**overrides), impl=impl)
    if sgd:
        t.optimizer = torch.optim.SGD([{"params": g["params"]} for g in t.optimizer.param_groups], lr=0.1)
    return t


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, 8, (n, P), generator=g)
    responses = torch.randint(2, 8, (n, R), generator=g)
    lengths = torch.randint(1, R + 1, (n,), generator=g)
    lengths[0] = R + 1  # row 0 never emits EOS
    position = torch.arange(R)[None]
    responses = torch.where(position < lengths[:, None] - 1, responses,
                            torch.where(position == lengths[:, None] - 1, EOS, PAD))
    return prompts, responses


def params(t: PPOTrainer):
    return [p.detach().clone() for p in [*t.policy.parameters(), *t.critic.parameters()]]


def assert_same_params(a, b, **tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


DDP_OVERRIDES = {"reward_norm": True, "kl_target": 0.5, "micro_batch_size": 2, "loss_agg": "seq-mean-token-mean"}


def ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t = trainer(sgd=True, **DDP_OVERRIDES)
        prompts, responses = batch()
        rows = slice(rank * 4, rank * 4 + 4)
        metrics = [t.step(prompts[rows], responses[rows]) for _ in range(2)]
        torch.save({"params": params(t), "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's exit, where torch's C++ teardown aborted a
    # gloo rank about one run in 25 (SIGABRT, "terminate called without an active exception": a gloo
    # worker std::thread destroyed unjoined; pytorch/pytorch#65231, #65513; see test_logprobs_parallel.py).
    os._exit(0)


