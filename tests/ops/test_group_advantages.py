"""fastrlhf.group_advantages against a float64 per-group loop, on both kernel backends."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import backend, reference

# The Triton interpreter evaluates both sides of tl.where in numpy, whose 0 / 0 on the discarded side warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def loop_reference(scores, index, mask=None, estimator="grpo", scale="group", eps=1e-6, unbiased=True,
                   singleton="raw", nan="propagate"):
    """The semantics of fastrlhf.group_advantages as a plain loop over groups, in Python floats (float64)."""
    if scores.dim() == 2:
        rows = [[float(x) for x, m in zip(r, k) if m] for r, k in zip(scores.tolist(), mask.tolist())]
        score, length = [sum(r) for r in rows], [float(len(r)) for r in rows]
    else:
        score, length = [float(x) for x in scores.tolist()], [1.0] * scores.shape[0]
    ids = index.tolist()
    valid = [not (nan == "ignore" and math.isnan(s)) for s in score]

    def std_of(xs):
        mean = sum(xs) / len(xs)
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - unbiased))

    def divide(a, d):
        return a / d if d != 0 or math.isnan(a) else 0.0

    batch_std = std_of([s for s, v in zip(score, valid) if v]) if estimator == "grpo" and scale == "batch" else 1.0
    adv, weight = [0.0] * len(score), [0.0] * len(score)
    for g in set(ids):
        members = [i for i, x in enumerate(ids) if x == g and valid[i]]
        n = len(members)
        if n == 1:
            (i,) = members
            if singleton == "error":
                raise ValueError("singleton")
            if singleton == "zero":
                adv[i] = score[i] - score[i]
                continue
            spread = {"group": 1 + eps, "batch": batch_std + eps, "none": 1.0}[scale] if estimator == "grpo" else 1.0
            adv[i], weight[i] = divide(score[i], spread), length[i]
            continue
        if n == 0:
            continue
        w = [length[i] if estimator == "opo" else 1.0 for i in members]
        total = sum(w)
        base = sum(wi * score[i] for wi, i in zip(w, members)) / total if total else 0.0
        spread = 1.0
        if estimator == "grpo" and scale == "group":
            spread = std_of([score[i] for i in members]) + eps
        elif estimator == "grpo" and scale == "batch":
            spread = batch_std + eps
        factor = n / (n - 1) if estimator == "rloo" else 1.0
        for i in members:
            adv[i], weight[i] = divide(factor * (score[i] - base), spread), length[i]
    if estimator == "reinforce++-baseline":
        count = sum(weight)
        mean = sum(w * a for w, a in zip(weight, adv) if w) / count
        var = sum(w * (a - mean) ** 2 for w, a in zip(weight, adv) if w) / (count - 1)
        adv = [(a - mean) / math.sqrt(var + 1e-8) if w else a for w, a in zip(weight, adv)]
    out = torch.tensor(adv, dtype=torch.float64)
    return torch.where(mask, out[:, None], 0.0) if scores.dim() == 2 else out


def token_inputs(B=24, T=6, seed=0, dtype=torch.float64):
    """Token rewards with NaN garbage outside the mask, hashed (large, unsorted) ids of mixed group sizes
    including groups of one."""
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(B, T, generator=g, dtype=torch.float64) + 3).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    rewards = rewards.masked_fill(~mask, math.nan)
    ids = torch.randint(0, 2**62, (12,), generator=g)
    index = ids[torch.randint(0, 10, (B,), generator=g)]
    index[:2] = ids[10:12]  # two groups of one
    return rewards, index, mask


def close(got, want, dtype):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, equal_nan=True,
                               **({} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-6}))


@pytest.fixture
def small_blocks(monkeypatch, kernel_backend):
    """Triton tiles smaller than the test's groups, rows and batch, so every multi-tile path runs."""
    if kernel_backend == "triton":
        kernels = backend.triton_kernels("group_advantages", torch.device("cpu"))
        for name, value in (("GROUP_BLOCK", 8), ("MOMENTS_BLOCK", 16), ("ROWS_BLOCK_T", 4),
                            ("BROADCAST_BLOCK_T", 4)):
            monkeypatch.setattr(kernels, name, value)


OPTIONS = {
    "grpo": [{}, {"scale": "batch"}, {"scale": "none"}, {"unbiased": False, "eps": 0.0}, {"singleton": "zero"},
             {"scale": "batch", "unbiased": False, "singleton": "zero"}],
    "rloo": [{}, {"singleton": "zero"}],
    "reinforce++-baseline": [{}, {"singleton": "zero"}],
    "opo": [{}, {"singleton": "zero"}],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("estimator", list(OPTIONS))
def test_token_input_matches_the_loop(kernel_backend, small_blocks, estimator, dtype):
    rewards, index, mask = token_inputs(dtype=dtype)
    # the interpreter is slow: every option in float64, the default in float32
    sweep = OPTIONS[estimator][:1] if kernel_backend == "triton" and dtype == torch.float32 else OPTIONS[estimator]
    for options in sweep:
        want = loop_reference(rewards.double(), index, mask, estimator, **options)
        close(fastrlhf.group_advantages(rewards, index, estimator=estimator, mask=mask, **options), want, dtype)
        if kernel_backend == "cpp":  # the plain-torch reference has the same semantics
            close(reference.group_advantages(rewards, index, estimator=estimator, mask=mask, **options), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequence_scores_match_the_loop(kernel_backend, dtype):
    rewards, index, mask = token_inputs(dtype=dtype, seed=1)
    scores = torch.where(mask, rewards, 0).sum(-1)
    index = torch.unique(index, return_inverse=True)[1] * 3 + 5  # int32 ids
    sweep = [("grpo", o) for o in OPTIONS["grpo"]] + [("rloo", {})]
    if kernel_backend == "triton" and dtype == torch.float32:  # the interpreter is slow
        sweep = sweep[:1]
    for estimator, options in sweep:
        want = loop_reference(scores.double(), index, None, estimator, **options)
        close(fastrlhf.group_advantages(scores, index.int(), estimator=estimator, **options), want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """The cpp backend only: the Triton interpreter mishandles bf16."""
    rewards, index, mask = token_inputs(dtype=dtype, seed=2)
    for estimator in OPTIONS:
        got = fastrlhf.group_advantages(rewards, index, estimator=estimator, mask=mask)
        close(got, loop_reference(rewards.double(), index, mask, estimator), torch.float32)


def test_singleton_modes(kernel_backend):
    scores = torch.tensor([2.0, 1.0, 3.0, -4.0], dtype=torch.float64)
    index = torch.tensor([7, 5, 5, 9])
    raw = fastrlhf.group_advantages(scores, index)
    assert raw[0] == 2.0 / (1 + 1e-6) and raw[3] == -4.0 / (1 + 1e-6)  # verl: mean 0, std 1
    assert fastrlhf.group_advantages(scores, index, estimator="rloo")[[0, 3]].tolist() == [2.0, -4.0]
    assert fastrlhf.group_advantages(scores, index, scale="none")[[0, 3]].tolist() == [2.0, -4.0]
    zero = fastrlhf.group_advantages(scores, index, singleton="zero")
    assert zero[[0, 3]].tolist() == [0.0, 0.0] and torch.equal(zero[1:3], raw[1:3])
    with pytest.raises(ValueError, match="singleton"):
        fastrlhf.group_advantages(scores, index, singleton="error")
    # nan="ignore": a group of two with one NaN has one scored member
    with pytest.raises(ValueError, match="singleton"):
        fastrlhf.group_advantages(torch.tensor([1.0, math.nan, 2.0, 3.0]), torch.tensor([0, 0, 1, 1]),
                                  singleton="error", nan="ignore")


def test_unchecked_singleton_error_gives_nan():
    """Where values are not checked (CUDA without FASTRLHF_CHECKS), the Triton kernels poison the group."""
    pytest.importorskip("triton")
    kernels = backend.triton_kernels("group_advantages", torch.device("cpu"))
    scores, index = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([4, 5, 5])
    out = torch.zeros(3)
    kernels.group_advantages(scores, index, None, "grpo", "group", 1e-6, True, "error", "propagate", out)
    assert out[0].isnan() and out[1:].isfinite().all()
    kernels.group_advantages(scores, -index, None, "grpo", "group", 1e-6, True, "raw", "propagate", out)
    assert out.isnan().all()  # negative ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_scores_give_exactly_zero(kernel_backend, dtype):
    index = torch.arange(3).repeat(4) * 1000
    rewards = torch.zeros(12, 5, dtype=dtype)
    rewards[:, 0] = 0.1 * (index + 1)  # one score per group, not representable exactly
    mask = torch.ones(12, 5, dtype=torch.bool)
    mask[::4, 3:] = False  # different lengths, same scores
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for estimator in OPTIONS:
        for options in ({}, {"eps": 0.0}):
            got = fastrlhf.group_advantages(rewards, index, estimator=estimator, mask=mask, **options)
            assert torch.equal(got, torch.zeros_like(got)), (estimator, options, got)
    scores = torch.full((8,), 1 / 3, dtype=dtype)
    assert torch.equal(fastrlhf.group_advantages(scores, index[:8]), torch.zeros(8, dtype=out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_group_with_one_outlier(dtype):
    """10^6 equal scores and one a unit above: E[x^2] - E[x]^2 in fp32 would lose everything."""
    n = 10**6 + 1
    scores = torch.full((n,), 10000.1, dtype=dtype)
    scores[n // 2] += 1
    got = fastrlhf.group_advantages(scores, torch.zeros(n, dtype=torch.int64), eps=0.0)
    mean = 1 / n  # relative to the common value
    std = math.sqrt(((n - 1) * mean**2 + (1 - mean) ** 2) / (n - 1))
    assert math.isclose(got[0].item(), -mean / std, rel_tol=1e-6)
    assert math.isclose(got[n // 2].item(), (1 - mean) / std, rel_tol=1e-6)
    assert torch.equal(got[: n // 2], got[:1].expand(n // 2))


def test_shuffled_rows_shuffle_the_result(kernel_backend):
    rewards, index, mask = token_inputs(seed=3)
    perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))
    for estimator in OPTIONS if kernel_backend == "cpp" else ("grpo", "opo"):  # the interpreter is slow
        got = fastrlhf.group_advantages(rewards, index, estimator=estimator, mask=mask)
        shuffled = fastrlhf.group_advantages(rewards[perm], index[perm], estimator=estimator, mask=mask[perm])
        torch.testing.assert_close(shuffled, got[perm], rtol=1e-12, atol=1e-12)


def test_a_group_does_not_depend_on_the_others(kernel_backend, small_blocks):
    rewards, index, mask = token_inputs(B=64, T=3, seed=4, dtype=torch.float32)
    index[:32] = 12345  # one group of 32 members, then others interleaved with it
    index[32:] = torch.arange(32, 64) % 7
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    rewards, index, mask = rewards[perm], index[perm], mask[perm]
    alone = index == 12345
    for estimator in ("grpo", "rloo", "opo"):
        together = fastrlhf.group_advantages(rewards, index, estimator=estimator, mask=mask)[alone]
        by_itself = fastrlhf.group_advantages(rewards[alone], index[alone], estimator=estimator, mask=mask[alone])
        assert torch.equal(together, by_itself), estimator
        if kernel_backend == "cpp":  # deterministic: the same call, the same bits (the interpreter is slow)
            again = fastrlhf.group_advantages(rewards, index, estimator=estimator, mask=mask)[alone]
            assert torch.equal(together, again)


def test_nan_modes(kernel_backend):
    rewards, index, mask = token_inputs(seed=5)
    row = int((index == index[10]).nonzero()[0])
    poisoned = rewards.clone()
    poisoned[row, 0] = math.nan  # a masked-in token
    same_group = index == index[row]
    clean = fastrlhf.group_advantages(rewards, index, mask=mask)
    spread = fastrlhf.group_advantages(poisoned, index, mask=mask)
    assert spread[same_group][mask[same_group]].isnan().all()
    assert torch.equal(spread[~same_group], clean[~same_group])
    for estimator in OPTIONS:
        ignored = fastrlhf.group_advantages(poisoned, index, estimator=estimator, mask=mask, nan="ignore")
        assert (ignored[row] == 0).all()
        want = loop_reference(poisoned, index, mask, estimator, nan="ignore")
        torch.testing.assert_close(ignored, want)


def test_out_and_dtypes(kernel_backend):
    rewards, index, mask = token_inputs(seed=6, dtype=torch.float32)
    out = torch.full_like(rewards, 7.0)
    assert fastrlhf.group_advantages(rewards, index, mask=mask, out=out) is out
    torch.testing.assert_close(out, fastrlhf.group_advantages(rewards, index, mask=mask), rtol=0, atol=0)
    grad = fastrlhf.group_advantages(rewards.requires_grad_(), index, mask=mask)
    assert not grad.requires_grad  # advantages are data


def test_bad_input_names_the_argument():
    rewards, index, mask = token_inputs(B=4, T=3, seed=7, dtype=torch.float32)
    scores = rewards[:, 0]
    bad = [
        (dict(scores=rewards.int()), TypeError, "scores"),
        (dict(index=index.float()), TypeError, "index"),
        (dict(index=index[:3]), ValueError, "index"),
        (dict(index=-index - 1), ValueError, "index: expected non-negative"),
        (dict(mask=None), ValueError, "mask"),
        (dict(mask=mask[:, :2]), ValueError, "mask"),
        (dict(estimator="ppo"), ValueError, "estimator"),
        (dict(scale="tokens"), ValueError, "scale"),
        (dict(singleton="drop"), ValueError, "singleton"),
        (dict(nan="zero"), ValueError, "nan"),
        (dict(eps=-1e-6), ValueError, "eps"),
        (dict(unbiased=1), TypeError, "unbiased"),
        (dict(out=torch.empty(4, 3, dtype=torch.float64)), TypeError, "out"),
        (dict(out=torch.empty(4, 2)), ValueError, "out"),
        (dict(scores=scores, mask=None, estimator="opo"), ValueError, "scores: estimator 'opo' needs"),
        (dict(scores=scores, mask=None, estimator="reinforce++-baseline"), ValueError, "scores"),
        (dict(scores=scores), ValueError, "mask: expected None"),
    ]
    for change, error, message in bad:
        args = {"scores": rewards, "index": index, "mask": mask, **change}
        with pytest.raises(error, match=message):
            fastrlhf.group_advantages(args.pop("scores"), args.pop("index"), **args)


def test_direct_cpp_calls_check_their_inputs():
    op = backend.cpp_ops().group_advantages
    rewards, index, mask = token_inputs(B=4, T=3, seed=8, dtype=torch.float32)
    out = torch.empty_like(rewards)
    scores = rewards[:, 0].contiguous()
    good = (rewards, index, mask, "grpo", "group", 1e-6, True, "raw", "propagate", out)
    op(*good)
    bad = [
        ({0: rewards.t()}, "scores: expected a contiguous"),
        ({1: index[:3]}, "index: expected shape"),
        ({1: index.float()}, "index: expected dtype"),
        ({1: -index - 1}, "index: expected non-negative"),
        ({2: None}, "mask: expected a"),
        ({2: mask.float()}, "mask: expected dtype"),
        ({2: mask[:2]}, "mask: expected shape"),
        ({3: "ppo"}, "estimator"),
        ({4: "x"}, "scale"),
        ({5: -1.0}, "eps"),
        ({7: "x"}, "singleton"),
        ({8: "x"}, "nan"),
        ({9: out.double()}, "out: expected dtype"),
        ({9: out[:2]}, "out: expected shape"),
        ({0: scores, 2: None, 3: "opo", 9: out[:, 0].contiguous()}, "scores: estimator 'opo'"),
        ({0: scores, 9: out[:, 0].contiguous()}, "mask: expected None"),
        ({7: "error", 1: torch.arange(4)}, "singleton: group"),
    ]
    for change, message in bad:
        args = list(good)
        for k, v in change.items():
            args[k] = v
        with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
            op(*args)


def test_opcheck():
    rewards, index, mask = token_inputs(B=6, T=4, seed=9)
    out = torch.empty_like(rewards)
    torch.library.opcheck(torch.ops.fastrlhf.group_advantages,
                          (rewards, index, mask, "reinforce++-baseline", "group", 1e-6, True, "raw", "ignore", out))
    scores = rewards[:, 0].contiguous()
    torch.library.opcheck(torch.ops.fastrlhf.group_advantages,
                          (scores, index, None, "grpo", "batch", 1e-6, False, "zero", "propagate", out[:, 0].clone()))


def test_compile_fullgraph():
    rewards, index, mask = token_inputs(seed=10, dtype=torch.float32)
    compiled = torch.compile(lambda r, i, m: fastrlhf.group_advantages(r, i, mask=m, estimator="rloo") * 2,
                             fullgraph=True)
    torch.testing.assert_close(compiled(rewards, index, mask),
                               fastrlhf.group_advantages(rewards, index, mask=mask, estimator="rloo") * 2)
