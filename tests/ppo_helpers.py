"""Tiny models, a fixed batch and the DDP worker shared by tests/test_ppo.py and tests/test_grpo.py
(imported by name, also in the worker processes that torch.multiprocessing spawns)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from fastrlhf.models import TinyGPT, TinyGPTConfig, ValueModel
from fastrlhf.grpo import GRPOConfig, GRPOTrainer
from fastrlhf.ppo import PPOConfig, PPOTrainer
from fastrlhf.sampling import response_mask

EOS, PAD, P, R = 1, 0, 3, 5


def models(seed=0, d_model=16):
    torch.manual_seed(seed)
    cfg = TinyGPTConfig(vocab_size=8, n_layer=1, n_head=2, d_model=d_model, max_len=P + R)
    return TinyGPT(cfg), ValueModel(TinyGPT(cfg))


ALGOS = {"ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}
N = 2  # GRPO's responses per prompt in these tests


def config(algo="ppo", **overrides):
    defaults = {"max_new_tokens": R, "eos_id": EOS, "pad_id": PAD, "lr": 1e-2, "ppo_epochs": 2, "kl_coef": 0.1,
                "missing_eos_penalty": 0.5, **({"n": N} if algo == "grpo" else {})}
    return ALGOS[algo][0](**{**defaults, **overrides})


def trainer(impl="fused", seed=0, d_model=16, sgd=False, algo="ppo", **overrides):
    """A trainer on fresh tiny models; ``sgd``: plain SGD, whose update is proportional to the gradient
    (Adam's first step is about lr * sign(grad), which turns rounding noise in tiny gradients into lr)."""
    t = ALGOS[algo][1](*models(seed, d_model), config(algo, **overrides), impl=impl)
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


def grpo_batch(n=8):
    """``batch(n)``'s responses as ``N`` answers to each of its prompts ``0, N, 2N, ...``."""
    prompts, responses = batch(n)
    return prompts[::N], responses


def params(t):
    return [p.detach().clone() for model in t.models.values() for p in model.parameters()]


def assert_same_params(a, b, **tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def first_loss_and_gradients(t, prompts, responses):
    """The experience, its metrics, the loss, its metric shares and the gradients of the first
    micro-batch (the whole batch, before any update)."""
    prompts = prompts.repeat_interleave(len(responses) // len(prompts), dim=0)
    experience, metrics = t._experience(prompts, responses, response_mask(responses, EOS))
    loss, shares = t._loss(experience, torch.arange(len(responses)), tokens=experience.mask.sum().item(),
                           sequences=len(responses))
    loss.backward()
    grads = [p.grad for model in t.models.values() for p in model.parameters() if p.requires_grad]
    return experience, metrics, loss, shares, grads


def assert_fused_equals_reference_first_step(algo, fields, **overrides):
    """Fused and reference ops give the same experience ``fields``, metrics, loss and gradients."""
    prompts, responses = batch() if algo == "ppo" else grpo_batch()
    fused, reference = (first_loss_and_gradients(trainer(impl, algo=algo, **overrides), prompts, responses)
                        for impl in ("fused", "reference"))
    for field in fields:
        torch.testing.assert_close(getattr(fused[0], field), getattr(reference[0], field), rtol=1e-5, atol=1e-5)
    assert fused[1] == pytest.approx(reference[1], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-5, atol=1e-6)
    for key in fused[3]:
        torch.testing.assert_close(fused[3][key].double(), reference[3][key].double(), rtol=1e-5, atol=1e-6)
    assert_same_params(fused[4], reference[4], rtol=1e-4, atol=1e-6)


def assert_resume_gives_the_same_next_step(tmp_path, algo, keys, **overrides):
    """A run saved after one step and resumed takes the same second step, bit for bit, as a run that
    never stopped: parameters, and the metrics ``keys``."""
    prompts = (batch() if algo == "ppo" else grpo_batch())[0]
    straight = trainer(algo=algo, **overrides)
    straight.step(prompts)
    expected = straight.step(prompts)

    first = trainer(algo=algo, **overrides)
    first.step(prompts)
    first.save(tmp_path / "run.ckpt")
    resumed = trainer(algo=algo, **overrides)
    resumed.load(tmp_path / "run.ckpt")
    got = resumed.step(prompts)
    assert_same_params(params(straight), params(resumed), rtol=0, atol=0)
    assert all(got[k] == expected[k] for k in keys)
    assert resumed.step_count == 2


DDP_OVERRIDES = {
    "ppo": {"reward_norm": True, "kl_target": 0.5, "micro_batch_size": 2, "loss_agg": "seq-mean-token-mean"},
    # batch statistics in the advantages (whitening over the batch), and in the scores
    "grpo": {"reward_norm": True, "estimator": "reinforce++-baseline", "micro_batch_size": 3,
             "loss_agg": "seq-mean-token-mean", "ent_coef": 0.01},
}


def ddp_worker(rank, world, init_file, out_dir, algo="ppo"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t = trainer(sgd=True, algo=algo, **DDP_OVERRIDES[algo])
        prompts, responses = batch() if algo == "ppo" else grpo_batch()
        prompt_rows = slice(rank * len(prompts) // world, (rank + 1) * len(prompts) // world)
        rows = slice(rank * 4, rank * 4 + 4)
        metrics = [t.step(prompts[prompt_rows], responses[rows]) for _ in range(2)]
        torch.save({"params": params(t), "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's exit, where torch's C++ teardown aborted a
    # gloo rank about one run in 25 (SIGABRT, "terminate called without an active exception": a gloo
    # worker std::thread destroyed unjoined; pytorch/pytorch#65231, #65513; see test_logprobs_parallel.py).
    os._exit(0)




def assert_ddp_matches_one_batch(tmp_path, algo, keys):
    """Two gloo ranks, each with half the batch, end two steps with the parameters and the metrics
    ``keys`` of one process on the whole batch."""
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), algo), nprocs=2, join=True)
    single = trainer(sgd=True, algo=algo, **DDP_OVERRIDES[algo])
    prompts, responses = batch() if algo == "ppo" else grpo_batch()
    expected = [single.step(prompts, responses) for _ in range(2)]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same_params(params(single), got["params"], rtol=1e-4, atol=1e-5)
        for key in keys:
            assert got["metrics"][-1][key] == pytest.approx(expected[-1][key], rel=1e-4, abs=1e-6), key


def hugging_face_models():
    """A tiny GPT-2 policy and a reward model on another, or a skip without transformers."""
    transformers = pytest.importorskip("transformers")
    from fastrlhf.models import HFCausalLM

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=8, n_embd=16, n_layer=1, n_head=2,
                                                                    n_positions=P + R))

    return gpt2(), ValueModel(HFCausalLM(gpt2()))
