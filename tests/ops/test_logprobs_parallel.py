"""Vocab-parallel ``fastrlhf.logprobs(process_group=...)``: two gloo processes on CPU, each holding a vocab
shard, against the unsharded op and the float64 reference on the same full logits.

Each rank is this file run as a script (``python test_logprobs_parallel.py WORKER RANK INIT_METHOD``), so
the ranks need not import the test module by name (pytest imports it under a name that a child process
may resolve to another package).
"""

import os
import subprocess
import sys
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastrlhf
from fastrlhf import backend, reference

WORLD = 2


def _spawn(worker: str):
    """Runs ``worker(rank)`` on 2 gloo ranks; a failure in either (or a hang) fails the test with its output."""
    root = os.path.dirname(os.path.dirname(fastrlhf.__file__))  # the ranks import this same fastrlhf
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'rendezvous')}"
        ranks = [subprocess.Popen([sys.executable, __file__, worker, str(rank), init_method], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(WORLD)]
        try:
            outputs = [rank.communicate(timeout=240)[0] for rank in ranks]
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
    failed = [f"rank {r} exited with {p.returncode}:\n{out}" for r, (p, out) in enumerate(zip(ranks, outputs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)


def _init_and_run(worker, rank, init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        with backend.poison_outputs():
            worker(rank)
    finally:
        dist.destroy_process_group()


def _logits(rows, vocab, dtype, seed):
    """Full ``[rows, vocab]`` logits, identical on every rank: a peaked row, a row of equal logits, a row whose
    upper half is -inf (a whole shard in every configuration below), a row whose label's logit is -inf, and
    -inf columns (a padded vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    x[1, 7] += 25.0
    x[2] = 0.5
    x[3, vocab // 2:] = -torch.inf
    x[:, -5:] = -torch.inf
    labels = torch.randint(0, vocab - 5, (rows,), generator=g)
    labels[3] = 0
    labels[4] = vocab - 1  # a -inf logit
    labels[0] = labels[rows // 2] = -100
    return x.to(dtype), labels


def _expected(x, labels, temperature, grads, return_entropy):
    """float64 reference outputs and logits' gradient; -inf logits as a huge negative number, which gives
    the same limits (p = 0) where autograd of ``p * z`` at ``z = -inf`` would give NaN."""
    z = x.double().masked_fill(x.isneginf(), -1e30).requires_grad_()
    out = reference.logprobs(z, labels, temperature=temperature, return_entropy=True)
    loss = (out[0] * grads[0]).sum() + ((out[1] * grads[1]).sum() if return_entropy else 0)
    (grad,) = torch.autograd.grad(loss, z)
    return out[0].detach(), out[1].detach(), grad


def _run(logits, labels, temperature, grads, return_entropy, **kw):
    """Outputs of ``fastrlhf.logprobs`` and the backward of ``sum(grads * outputs)``."""
    out = fastrlhf.logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy, **kw)
    logp, entropy = out if return_entropy else (out, None)
    loss = (logp * grads[0]).sum() + ((entropy * grads[1]).sum() if return_entropy else 0)
    loss.backward()
    return logp.detach(), None if entropy is None else entropy.detach()


def _check_shard(rank, dtype, starts, widths, temperature, leading, return_entropy, inplace):
    """One configuration: this rank's shard of the same logits against the unsharded op and float64."""
    vocab = sum(widths)
    x, labels = _logits(leading[0] * leading[1], vocab, dtype, seed=vocab)
    x, labels = x.view(*leading, vocab), labels.view(leading)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(leading, generator=g, dtype=torch.float64) for _ in range(2)]
    start, width = starts[rank], widths[rank]

    leaf = x[..., start:start + width].clone().requires_grad_()
    shard = leaf * 1  # a non-leaf, as logits are, so that the in-place backward may overwrite it
    version = shard._version
    logp, entropy = _run(shard, labels, temperature, grads, return_entropy, process_group=dist.group.WORLD,
                         vocab_start_index=start if start != rank * width else None, inplace_backward=inplace)
    grad = leaf.grad
    if inplace:
        assert shard._version > version and torch.equal(shard.detach(), grad)

    full = x.clone().requires_grad_()
    full_logp, full_entropy = _run(full, labels, temperature, grads, return_entropy)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    low = dtype in (torch.bfloat16, torch.float16)
    # The unsharded kernel on the same numbers: only the combination's rounding differs.
    torch.testing.assert_close(logp, full_logp, rtol=1e-5, atol=1e-5)
    if return_entropy:
        torch.testing.assert_close(entropy, full_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, full.grad[..., start:start + width], atol=1e-5, rtol=0.02 if low else 1e-4)

    exact_logp, exact_entropy, exact_grad = _expected(x, labels, temperature, grads, return_entropy)
    finite = labels != vocab - 1
    torch.testing.assert_close(logp.double()[finite], exact_logp[finite], rtol=1e-5, atol=1e-5)
    assert logp[~finite].isneginf().all()
    if return_entropy:
        torch.testing.assert_close(entropy.double(), exact_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), exact_grad[..., start:start + width], atol=1e-4 if low else 1e-6,
                               rtol=0.02 if low else 1e-4)
    ignored = labels == -100
    assert (logp[ignored] == 0).all() and (grad[ignored] == 0).all()


CONFIGS = {
    # dtype, per-rank vocab starts and widths, temperature, leading shape, return_entropy, inplace
    "even fp32, float temperature": (torch.float32, [0, 500], [500, 500], 0.5, (3, 7), True, False),
    "uneven, rank 0 holds the top": (torch.float32, [477, 0], [300, 477], "per sequence", (4, 5), True, False),
    "logp only, in place": (torch.float32, [0, 513], [513, 513], 2.0, (2, 9), False, True),
    "bf16, in place": (torch.bfloat16, [0, 700], [700, 301], "per token", (3, 6), True, True),
    "fp64 (fp64 statistics)": (torch.float64, [0, 300], [300, 300], "per token", (2, 6), True, False),
}


def _temperature(kind, leading):
    if kind == "per sequence":
        return torch.tensor([0.5, 1.0, 2.0, 0.7][: leading[0]], dtype=torch.float32)[:, None]
    if kind == "per token":
        return torch.rand(leading, generator=torch.Generator().manual_seed(3)) + 0.5
    return kind


def _all_configs(rank):
    for name, (dtype, starts, widths, temperature, leading, return_entropy, inplace) in CONFIGS.items():
        try:
            _check_shard(rank, dtype, starts, widths, _temperature(temperature, leading), leading, return_entropy,
                         inplace)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}, {name}: {err}") from None


def test_two_ranks_match_unsharded_and_float64():
    _spawn("_all_configs")


def _bad_layouts(rank):
    group = dist.group.WORLD
    labels = torch.tensor([0, 5, -100])

    def call(logits, start=None, lab=labels):
        return fastrlhf.logprobs(logits, lab, process_group=group, vocab_start_index=start)

    # Every rank raises, after the same collectives, so none is left waiting in the next one.
    with pytest.raises(ValueError, match=r"vocab_start_index: .*tile.*\[\(0, 8\), \(4, 12\)\]"):
        call(torch.randn(3, 8), start=4 * rank)
    with pytest.raises(ValueError, match=r"vocab_start_index: .*\[\(0, 8\), \(6, 12\)\]"):
        call(torch.randn(3, 8 - 2 * rank))  # default starts rank * V with unequal widths
    with pytest.raises(ValueError, match=r"vocab_start_index: .*\[\(2, 10\), \(10, 18\)\]"):
        call(torch.randn(3, 8), start=2 + 8 * rank)
    with pytest.raises(ValueError, match=r"logits: expected the same number of rows on every rank, got \[3, 4\]"):
        call(torch.randn(3 + rank, 8), lab=torch.zeros(3 + rank, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 16\) or ignore_index=-100, got 16"):
        call(torch.randn(3, 8), lab=torch.tensor([0, 16, -100]))
    # A valid call still works after the errors: nothing was left in flight.
    logp = call(torch.randn(3, 8))
    assert logp.isfinite().all() and logp[2] == 0


def test_bad_layouts_and_labels_raise_on_every_rank():
    _spawn("_bad_layouts")


if __name__ == "__main__":
    _init_and_run(globals()[sys.argv[1]], int(sys.argv[2]), sys.argv[3])
    # Every check has passed and the process group is destroyed. About one run in 30 a rank then aborted in
    # the interpreter's exit ("terminate called without an active exception", SIGABRT, after the last Python
    # line): std::terminate from a std::thread destroyed unjoined, i.e. a ProcessGroupGloo whose worker
    # threads outlive destroy_process_group until C++ teardown (pytorch/pytorch#65231 and its test-side fix
    # pytorch/pytorch#65513; an atexit teardown in init_process_group, pytorch/pytorch#179291, was
    # abandoned). fastrlhf starts no threads of its own; a bare 2-rank gloo all_gather + destroy + normal exit
    # did not abort in ~120 runs (43 plain, 77 with fastrlhf imported), so the trigger is in torch's teardown
    # of what these ranks do, not identified further. So the rank leaves without the interpreter's exit.
    sys.stdout.flush()
    os._exit(0)
