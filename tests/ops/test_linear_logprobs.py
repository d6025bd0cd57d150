"""fastrlhf.linear_logprobs against logprobs(hidden @ weight.T + bias) and the float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastrlhf
from fastrlhf import backend, reference
from fastrlhf.ops.linear_logprobs import accumulate_mm, budgets, chunking, mixed_precision_gemm

F64 = torch.float64
IGNORE = -100


def inputs(tokens, H, V, seed=0, bias=True, shape=None):
    """float64 hidden states, weight and bias of realistic scale (logits of std ~3), labels with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * (3.0 / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=F64) if bias else None
    labels = torch.randint(0, V, (tokens,), generator=g)
    labels[::5] = IGNORE
    if shape is not None:
        hidden, labels = hidden.reshape(*shape, H), labels.reshape(shape)
    return hidden, weight, b, labels


def upstream_for(labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)


def run(fn, hidden, weight, bias, labels, upstream, dtype, **kw):
    """(logp, entropy, grad hidden, grad weight[, grad bias]) of ``fn`` on leaves cast to ``dtype``."""
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    logp, entropy = fn(leaves[0], leaves[1], labels, bias=b, return_entropy=True, **kw)
    grads = torch.autograd.grad((logp * upstream[0].to(logp)).sum() + (entropy * upstream[1].to(logp)).sum(), leaves)
    return [logp.detach(), entropy.detach(), *grads]


def unfused(hidden, weight, labels, *, bias=None, **kw):
    """fastrlhf.logprobs on the whole logits tensor: the op this one must equal."""
    return fastrlhf.logprobs(F.linear(hidden, weight, bias), labels, **kw)


NAMES = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")


def assert_close(got, want, rtol=2e-5, atol=2e-5):
    for name, x, y in zip(NAMES, got, want):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, "per-token"])
def test_matches_float64_reference_and_unfused(kernel_backend, chunk_size, temperature):
    hidden, weight, bias, labels = inputs(50, 24, 301, seed=3)
    if temperature == "per-token":
        temperature = 0.5 + torch.rand(50, generator=torch.Generator().manual_seed(4))
    up = upstream_for(labels)
    got = run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, up, torch.float32, temperature=temperature,
              chunk_size=chunk_size)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_close(got, run(reference.linear_logprobs, hidden, weight, bias, labels, up, F64, temperature=temperature))
    assert_close(got, run(unfused, hidden, weight, bias, labels, up, torch.float32, temperature=temperature))


def test_ignored_rows_give_zero_and_no_gradient(kernel_backend):
    hidden, weight, bias, labels = inputs(12, 8, 40, seed=5)
    logp, entropy, grad_h, *_ = run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, upstream_for(labels),
                                    torch.float32, chunk_size=5)
    ignored = labels == IGNORE
    assert ignored.any() and (~ignored).any()
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (grad_h[ignored] == 0).all()
    assert (logp[~ignored] < 0).all() and (entropy[~ignored] > 0).all()


def test_leading_shape_without_bias_and_logp_only(kernel_backend):
    hidden, weight, _, labels = inputs(21, 16, 77, seed=6, bias=False, shape=(3, 7))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp = fastrlhf.linear_logprobs(h, w, labels, chunk_size=4)
    assert logp.shape == (3, 7)
    g = upstream_for(labels)[0]
    got = [logp.detach(), *torch.autograd.grad((logp * g).sum(), (h, w))]
    hd, wd = hidden.requires_grad_(), weight.requires_grad_()
    want_logp = reference.linear_logprobs(hd, wd, labels)
    want = [want_logp.detach(), *torch.autograd.grad((want_logp * g.double()).sum(), (hd, wd))]
    for name, x, y in zip(("logp", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_only_the_gradients_asked_for(kernel_backend):
    """A frozen weight (LoRA) or frozen hidden states get no gradient, and the others are unchanged."""
    hidden, weight, bias, labels = inputs(10, 8, 30, seed=7)
    h, w, b = hidden.float().requires_grad_(), weight.float(), bias.float().requires_grad_()
    logp = fastrlhf.linear_logprobs(h, w, labels, bias=b, chunk_size=3)
    grad_h, grad_b = torch.autograd.grad(logp.sum(), (h, b))
    full = run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, (torch.ones(10), torch.zeros(10)),
               torch.float32, chunk_size=3)
    torch.testing.assert_close(grad_h, full[2])
    torch.testing.assert_close(grad_b, full[4])


def test_tied_embedding_gets_both_gradients(kernel_backend):
    """The lm_head tied to the input embedding: the weight's gradient is the sum of both uses."""
    V, H, T = 50, 12, 9
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(8))
    labels = ids.roll(-1, dims=1)
    grads = []
    for fn in (fastrlhf.linear_logprobs, reference.linear_logprobs):
        torch.manual_seed(9)
        embedding = torch.nn.Embedding(V, H)
        mix = torch.nn.Linear(H, H)
        hidden = torch.tanh(mix(embedding(ids)))
        logp, entropy = fn(hidden, embedding.weight, labels, return_entropy=True, chunk_size=4)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        grads.append(embedding.weight.grad)
    lookup_rows = torch.zeros(V, dtype=torch.bool)
    lookup_rows[ids.reshape(-1)] = True
    assert not lookup_rows.all()  # rows used only by the lm_head too
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torchs_error(dtype):
    """Against float64: at most 2x the error of the same computation done by PyTorch in ``dtype``."""
    hidden, weight, bias, labels = inputs(64, 32, 500, seed=10)
    up = upstream_for(labels)
    with backend.use_backend("cpp"):
        got = run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, up, dtype, chunk_size=24)
    exact = run(reference.linear_logprobs, hidden, weight, bias, labels, up, F64)
    torch_same = run(reference.linear_logprobs, hidden, weight, bias, labels, up, dtype)
    for name, g, e, t in zip(NAMES, got, exact, torch_same):
        assert g.dtype == (torch.float32 if name in ("logp", "entropy") else dtype), name
        err, base = (g.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{name}: error {err:.3g}, torch's own {base:.3g}"


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(kernel_backend, bias):
    """fp64 runs the matmuls and the log-prob kernels in fp64, so finite differences are exact enough."""
    hidden, weight, b, labels = inputs(7, 5, 9, seed=11, bias=bias)
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    temperature = 0.5 + torch.rand(7, generator=torch.Generator().manual_seed(2), dtype=F64)

    def fn(h, w, b=None):
        return fastrlhf.linear_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True,
                                        chunk_size=3)

    torch.autograd.gradcheck(fn, leaves)
    logp, entropy = fn(*leaves)
    assert logp.dtype == entropy.dtype == F64
    want = reference.linear_logprobs(*leaves[:2], labels, bias=leaves[2] if bias else None,
                                     temperature=temperature, return_entropy=True)
    torch.testing.assert_close((logp, entropy), want)


def test_opcheck(kernel_backend):
    hidden, weight, bias, labels = inputs(9, 6, 23, seed=12)
    h, w, b = hidden.float(), weight.float(), bias.float()
    inv_temp = torch.full((9,), 1.25)
    fwd = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, inv_temp, None, None, None, IGNORE,
           4, 5)
    torch.library.opcheck(torch.ops.fastrlhf.linear_logprobs_forward, fwd)
    torch.library.opcheck(torch.ops.fastrlhf.linear_logprobs_forward, (*fwd, True))  # with the extras
    _, entropy, lse, threshold, extras = torch.ops.fastrlhf.linear_logprobs_forward(h.detach(), w.detach(),
                                                                                    b.detach(), *fwd[3:])
    assert threshold.shape == (0,) and extras.shape == (0,)
    g = upstream_for(labels)
    for needs in ([True, True, True], [True, False, False]):
        bwd = (h.detach(), w.detach(), b.detach(), labels, inv_temp, None, lse, entropy, g[0], g[1], IGNORE, 4, 5,
               needs)
        torch.library.opcheck(torch.ops.fastrlhf.linear_logprobs_backward, bwd)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    hidden, weight, bias, labels = inputs(20, 16, 90, seed=13)
    temperature = torch.full((20,), 0.9)
    up = upstream_for(labels)

    @torch.compile(fullgraph=True, backend=compiler)
    def step(h, w, b):
        logp, entropy = fastrlhf.linear_logprobs(h, w, labels, bias=b, temperature=temperature,
                                                 return_entropy=True, chunk_size=6)
        return (logp * up[0]).sum() + (entropy * up[1]).sum(), logp

    leaves = [t.float().requires_grad_() for t in (hidden, weight, bias)]
    loss, logp = step(*leaves)
    got = [logp.detach(), *torch.autograd.grad(loss, leaves)]
    want = run(fastrlhf.linear_logprobs, hidden, weight, bias, labels, up, torch.float32, temperature=temperature,
               chunk_size=6)
    for name, x, y in zip(("logp", "grad hidden", "grad weight", "grad bias"), got, [want[0], *want[2:]]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_reference_backend_is_the_unfused_form():
    hidden, weight, bias, labels = inputs(8, 4, 11, seed=14)
    with backend.use_backend("reference"):
        got = fastrlhf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    want = reference.logprobs(hidden @ weight.T + bias, labels, return_entropy=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_chunking_rule():
    # 4096 tokens x H 1024 x V 32000: 1024 tokens forward (the weight's size, under 128 MiB),
    # 512 columns (8 MiB) backward.
    assert chunking(None, 4096, 32000, 1024) == (1024, 512)
    assert chunking(None, 2048, 151936, 2048) == (220, 1024)    # 128 MiB forward, 8 MiB backward
    assert chunking(None, 512, 8000, 256) == (256, 256)         # at most H tokens and H columns
    assert chunking(None, 10, 32000, 1024) == (10, 1024)        # at most the tokens
    assert chunking(None, 1 << 20, 262144, 4096) == (128, 128)  # at least MIN_CHUNK and MIN_SLICE
    assert chunking(None, 100, 50, 8) == (32, 50)               # at most the vocabulary
    assert chunking(100, 50, 7, 4) == (50, 7)
    assert chunking(3, 50, 1000, 4) == (3, 60)                  # the backward slice holds as many logits
    # CUDA: 1 GiB each way, still at most H tokens and H columns.
    assert chunking(None, 16384, 151936, 4096, torch.device("cuda")) == (1766, 4096)
    assert chunking(None, 16384, 32000, 2048, torch.device("cuda")) == (2048, 2048)
    assert chunking(None, 4096, 32000, 1024, torch.device("cuda")) == chunking(None, 4096, 32000, 1024, "cuda")


def test_gemm_plan_per_device():
    """CUDA: GiB budgets and bf16/fp16 operands into fp32 accumulation; the CPU: MiB budgets and upcasts."""
    assert budgets(torch.device("cuda")) == (1 << 30, 1 << 30)
    assert budgets(torch.device("cpu")) == (128 << 20, 8 << 20)
    assert mixed_precision_gemm(torch.device("cuda")) and not mixed_precision_gemm(torch.device("cpu"))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixed", [True, False])
def test_accumulate_mm_runs_the_planned_gemm(monkeypatch, mixed):
    """bf16 operands: one mixed-precision addmm (``out_dtype``) and no upcast copy where the plan says so (CUDA;
    run here on meta tensors, which have that GEMM's shape rules), else upcast operands into an fp32 addmm."""
    device = "meta" if mixed else "cpu"
    monkeypatch.setattr("fastrlhf.ops.linear_logprobs.mixed_precision_gemm", lambda d: d.type == "meta")
    out = torch.zeros(4, 3, device=device)
    a, b = torch.randn(4, 8).bfloat16().to(device), torch.randn(8, 3).bfloat16().to(device)
    with _Ops() as seen:
        accumulate_mm(out, a, b)
    if mixed:
        assert seen.ops == ["aten.addmm.dtype_out"], seen.ops
    else:
        assert seen.ops == ["aten._to_copy.default", "aten._to_copy.default", "aten.addmm_.default"], seen.ops
        torch.testing.assert_close(out, a.float() @ b.float())


def test_empty_batch():
    hidden, weight, bias, labels = inputs(0, 4, 9)
    h = hidden.float().requires_grad_()
    logp, entropy = fastrlhf.linear_logprobs(h, weight.float(), labels, return_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    assert torch.autograd.grad(logp.sum(), h)[0].shape == (0, 4)


BAD = {
    "hidden dtype": (lambda h, w, l: (h.long(), w, l), {}, TypeError, "hidden: expected dtype"),
    "H mismatch": (lambda h, w, l: (h, w[:, :3], l), {}, ValueError, r"weight: expected shape \[V, 4\]"),
    "weight 1-D": (lambda h, w, l: (h, w[0], l), {}, ValueError, "weight: expected 2-D"),
    "weight dtype": (lambda h, w, l: (h, w.double(), l), {}, TypeError, "weight: expected dtype in \\(float32\\)"),
    "labels shape": (lambda h, w, l: (h, w, l[:-1]), {}, ValueError, r"labels: expected shape \(6,\)"),
    "labels dtype": (lambda h, w, l: (h, w, l.float()), {}, TypeError, "labels: expected dtype"),
    "label range": (lambda h, w, l: (h, w, l.clamp(min=0) + 9), {}, ValueError, r"labels: expected values in \[0, 9\)"),
    "bias shape": (lambda h, w, l: (h, w, l), {"bias": torch.zeros(8)}, ValueError, r"bias: expected shape \(9,\)"),
    "bias dtype": (lambda h, w, l: (h, w, l), {"bias": torch.zeros(9, dtype=F64)}, TypeError, "bias: expected dtype"),
    "chunk_size": (lambda h, w, l: (h, w, l), {"chunk_size": 0}, ValueError, "chunk_size: expected a positive"),
    "chunk_size type": (lambda h, w, l: (h, w, l), {"chunk_size": 2.0}, TypeError, "chunk_size: expected an int"),
    "temperature": (lambda h, w, l: (h, w, l), {"temperature": 0.0}, ValueError, "temperature: expected a positive"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input_names_the_argument(case):
    make, kw, error, match = BAD[case]
    hidden, weight, _, labels = inputs(6, 4, 9, seed=15)
    with pytest.raises(error, match=match):
        fastrlhf.linear_logprobs(*make(hidden.float(), weight.float(), labels), **kw)


def test_device_mismatch_names_the_argument():
    hidden, weight, _, labels = inputs(6, 4, 9, seed=15)
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu, got one on meta"):
        fastrlhf.linear_logprobs(hidden.float(), weight.float().to("meta"), labels)
