"""fastrlhf.logprobs against the float64 log_softmax + gather reference, on every backend."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf import backend, reference

F64 = torch.float64
IGNORE = -100


def inputs(rows, V, dtype=torch.float32, seed=0, scale=3.0):
    """Realistic logits: most rows random, one very peaked, one of equal logits; some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g, dtype=F64) * scale
    labels = torch.randint(0, V, (rows,), generator=g)
    if rows >= 3:
        logits[1, labels[1]] += 40.0   # peaked: p(label) ~ 1
        logits[2] = 0.7                # flat: every p = 1/V
    if rows >= 4:
        labels[3] = IGNORE
    return logits.to(dtype), labels


def exact(logits, labels, upstream=None, **kw):
    """float64 reference outputs, and the logits' gradient for upstream (g_logp, g_entropy) if given."""
    x = logits.to(F64).requires_grad_()
    temperature = kw.pop("temperature", 1.0)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(F64)
    logp, entropy = reference.logprobs(x, labels, temperature=temperature, return_entropy=True, **kw)
    if upstream is None:
        return logp.detach(), entropy.detach()
    grad = torch.autograd.grad((logp * upstream[0]).sum() + (entropy * upstream[1]).sum(), x)[0]
    return logp.detach(), entropy.detach(), grad


def fused(logits, labels, upstream, **kw):
    x = logits.clone().requires_grad_()
    logp, entropy = fastrlhf.logprobs(x, labels, return_entropy=True, **kw)
    assert logp.dtype == entropy.dtype == (F64 if logits.dtype == F64 else torch.float32)
    grad = torch.autograd.grad((logp * upstream[0]).sum() + (entropy * upstream[1]).sum(), x)[0]
    return logp.detach(), entropy.detach(), grad


def upstream_for(labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)


def assert_close_fp32(got, want, names=("logp", "entropy", "grad")):
    for name, x, y in zip(names, got, want):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("V", [1, 2, 33, 1000, 4097, 9000])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_float64_reference(kernel_backend, V, temperature):
    logits, labels = inputs(5, V, seed=V)
    up = upstream_for(labels)
    assert_close_fp32(fused(logits, labels, up, temperature=temperature),
                      exact(logits, labels, up, temperature=temperature))


def test_leading_shape_and_per_token_temperature(kernel_backend):
    logits, labels = inputs(2 * 3, 300, seed=3)
    logits, labels = logits.view(2, 3, 300), labels.view(2, 3)
    for temperature in (torch.tensor([[0.7], [1.3]]), torch.rand(2, 3, generator=torch.Generator().manual_seed(4)) + 0.5):
        up = upstream_for(labels)
        assert_close_fp32(fused(logits, labels, up, temperature=temperature),
                          exact(logits, labels, up, temperature=temperature))


def test_reference_backend_matches_float64():
    logits, labels = inputs(6, 500, seed=5)
    with backend.use_backend("reference"):
        logp, entropy = fastrlhf.logprobs(logits, labels, return_entropy=True)
    assert_close_fp32((logp, entropy), exact(logits, labels))


@pytest.mark.parametrize("V", [151936, 262144])
def test_large_vocab(kernel_backend, V):
    rows = 2 if kernel_backend == "triton" else 6
    logits, labels = inputs(rows, V, seed=6)
    up = upstream_for(labels)
    assert_close_fp32(fused(logits, labels, up), exact(logits, labels, up))


def test_rows_times_vocab_past_int32_cpp():
    """rows * V > 2^31: the last rows must be read at 64-bit offsets (bf16, 4.3 GB)."""
    rows, V = 14200, 151936
    logits = torch.empty(rows, V, dtype=torch.bfloat16)
    logits.view(torch.int16).fill_(0)  # bf16 zeros, written fast
    tail = inputs(4, V, dtype=torch.bfloat16, seed=7)[0]
    logits[-4:] = tail
    labels = torch.full((rows,), IGNORE)
    labels[-4:] = torch.tensor([0, 5, V - 1, 1234])
    with backend.use_backend("cpp"):
        logp, entropy = fastrlhf.logprobs(logits, labels, return_entropy=True)
    want_logp, want_entropy = exact(tail, labels[-4:])
    torch.testing.assert_close(logp[-4:].double(), want_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(entropy[-4:].double(), want_entropy, rtol=2e-5, atol=2e-5)
    assert (logp[:-4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    """bf16/fp16 logits are read exactly and upcast: outputs to fp32 accuracy; the gradient, stored in the
    logits' dtype, within twice the rounding of the exact gradient to that dtype."""
    logits, labels = inputs(8, 3000, dtype=dtype, seed=8)
    up = upstream_for(labels)
    backends = ["cpp"] + (["triton"] if dtype == torch.float16 else [])  # the interpreter mishandles bf16
    want = exact(logits, labels, up)
    for name in backends:
        with backend.use_backend(name):
            got = fused(logits, labels, up)
        assert got[2].dtype == dtype
        assert_close_fp32(got[:2], want[:2])
        rounding = (want[2].to(dtype).double() - want[2]).abs().max()
        assert (got[2].double() - want[2]).abs().max() <= 2 * rounding + 1e-7, name


def test_ignored_rows_give_zero_and_no_gradient(kernel_backend):
    logits, labels = inputs(6, 200, seed=9)
    labels[[0, 4]] = IGNORE
    logits[4] = math.nan  # an ignored row is never read into anything
    up = upstream_for(labels)
    logp, entropy, grad = fused(logits, labels, up)
    assert (logp[[0, 4]] == 0).all() and (entropy[[0, 4]] == 0).all()
    assert (grad[[0, 4]] == 0).all()
    keep = [1, 2, 3, 5]
    assert_close_fp32((logp[keep], entropy[keep], grad[keep]), exact(logits[keep], labels[keep], (up[0][keep], up[1][keep])))


def test_custom_ignore_index(kernel_backend):
    logits, labels = inputs(4, 50, seed=10)
    labels[2], labels[3] = 7, 9
    logp = fastrlhf.logprobs(logits, labels, ignore_index=7)
    assert logp[2] == 0
    torch.testing.assert_close(logp[[0, 1, 3]].double(), exact(logits, labels)[0][[0, 1, 3]], rtol=2e-5, atol=2e-5)


def test_minus_inf_logits(kernel_backend):
    """A padded vocabulary and top-k masking give -inf logits: finite results wherever the label's logit is
    finite, -inf log-prob (never NaN) where it is not, and finite gradients everywhere."""
    V = 5000
    logits, labels = inputs(5, V, seed=11)
    logits[:, 4900:] = -math.inf                      # vocabulary padded past 4900
    logits[0, :4000] = -math.inf                      # top-k: only 900 candidates left in row 0
    labels[0] = 4500
    labels[1] = 4950                                  # a label in the padding: log-prob -inf
    logits[2] = -math.inf                             # a row with nothing left
    up = upstream_for(labels)
    logp, entropy, grad = fused(logits, labels, up)
    assert logp[1] == -math.inf and logp[2] == -math.inf
    assert entropy[2] == 0
    assert grad.isfinite().all() and entropy.isfinite().all()
    assert (grad[:, 4900:][[0, 3, 4]] == 0).all()
    finite = [0, 3, 4]
    assert_close_fp32((logp[finite], entropy[finite], grad[finite]),
                      exact(logits[finite], labels[finite], (up[0][finite], up[1][finite])))


def test_inplace_backward_same_gradient_and_guarded(kernel_backend):
    logits, labels = inputs(5, 700, seed=12)
    up = upstream_for(labels)
    want = fused(logits, labels, up)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # the op's input is a non-leaf whose storage the backward may overwrite
    logp, entropy = fastrlhf.logprobs(x, labels, return_entropy=True, inplace_backward=True)
    version = x._version
    grad = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), x, retain_graph=True)[0]
    assert x._version > version, "the in-place write is declared to autograd"
    assert grad.data_ptr() == x.data_ptr(), "the gradient lives in the logits' storage"
    torch.testing.assert_close(grad, want[2])
    # Anything else that saved these logits now fails loudly instead of using the overwritten values.
    # Something saved these logits before (its backward runs after ours) and so sees them overwritten.
    y = leaf * 1.0
    other = (y * y).sum()
    logp = fastrlhf.logprobs(y, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


def test_batch_invariance(kernel_backend):
    """A row's results do not depend on the other rows in the batch."""
    logits, labels = inputs(9, 3000, seed=13)
    logp, entropy = fastrlhf.logprobs(logits, labels, return_entropy=True)
    for rows in ([4], [0, 4, 8], list(range(3, 9))):
        sub_logp, sub_entropy = fastrlhf.logprobs(logits[rows], labels[rows], return_entropy=True)
        assert torch.equal(sub_logp, logp[rows]) and torch.equal(sub_entropy, entropy[rows])


def test_only_logp_gets_a_gradient(kernel_backend):
    logits, labels = inputs(4, 300, seed=14)
    x = logits.clone().requires_grad_()
    g = torch.randn(4)
    grad = torch.autograd.grad((fastrlhf.logprobs(x, labels) * g).sum(), x)[0]
    xd = logits.double().requires_grad_()
    want = torch.autograd.grad((reference.logprobs(xd, labels) * g.double()).sum(), xd)[0]
    torch.testing.assert_close(grad.double(), want, rtol=2e-5, atol=2e-5)


def test_strided_logits(kernel_backend):
    """Rows with a stride larger than V (a slice of a wider tensor) are read in place."""
    wide, labels = inputs(4, 520, seed=15)
    logits = wide[:, 10:510]
    labels = labels.clamp(max=499)
    up = upstream_for(labels)
    assert_close_fp32(fused(logits, labels, up), exact(logits, labels, up))


def test_gradcheck_float64(kernel_backend):
    """fp64 logits are computed in fp64 throughout: finite differences check both outputs' gradients."""
    logits, labels = inputs(4, 7, dtype=F64, seed=16)
    logits[0, 2] = -math.inf  # a masked token: zero probability, zero gradient
    temperature = torch.tensor([0.8, 1.0, 1.7, 0.5], dtype=F64)
    x = logits.clone().requires_grad_()
    torch.autograd.gradcheck(lambda x: fastrlhf.logprobs(x, labels, temperature=temperature, return_entropy=True),
                             (x,))


def test_float64_matches_reference_to_float64_precision(kernel_backend):
    logits, labels = inputs(5, 3001, dtype=F64, seed=21)
    up = upstream_for(labels)
    got = fused(logits, labels, (up[0].double(), up[1].double()))
    for name, x, y in zip(("logp", "entropy", "grad"), got, exact(logits, labels, up)):
        assert x.dtype == F64
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")


def test_opcheck(kernel_backend):
    logits, labels = inputs(4, 37, seed=17)
    inv_temp = torch.full((4,), 1.25)
    g = upstream_for(labels)
    for threshold in (None, torch.full((4,), 0.5)):
        fwd = (logits.requires_grad_(), labels, inv_temp, threshold, IGNORE, 0, 37, False)
        torch.library.opcheck(torch.ops.fastrlhf.logprobs_forward, fwd)
        logp, entropy, lse = torch.ops.fastrlhf.logprobs_forward(logits.detach(), *fwd[1:])
        bwd = (logits.detach(), labels, inv_temp, threshold, lse, entropy, g[0], g[1], IGNORE, 0, 37)
        torch.library.opcheck(torch.ops.fastrlhf.logprobs_backward, bwd)
        torch.library.opcheck(torch.ops.fastrlhf.logprobs_backward_, (logits.detach().clone(), *bwd[1:]))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    logits, labels = inputs(6, 300, seed=18)
    temperature = torch.full((6,), 0.9)

    @torch.compile(fullgraph=True, backend=compiler)
    def loss(x, labels, temperature):
        logp, entropy = fastrlhf.logprobs(x, labels, temperature=temperature, return_entropy=True)
        return (logp * 2.0 - 0.01 * entropy).sum()

    x = logits.clone().requires_grad_()
    got = loss(x, labels, temperature)
    grad = torch.autograd.grad(got, x)[0]
    xd = logits.double().requires_grad_()
    logp, entropy = reference.logprobs(xd, labels, temperature=temperature.double(), return_entropy=True)
    want = (logp * 2.0 - 0.01 * entropy).sum()
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(want, xd)[0], rtol=2e-5, atol=2e-5)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), V=st.integers(1, 300), seed=st.integers(0, 2**16),
       temperature=st.floats(0.25, 4.0))
def test_property_random_shapes(rows, V, seed, temperature):
    logits, labels = inputs(rows, V, seed=seed)
    up = upstream_for(labels, seed)
    with backend.use_backend("cpp"), backend.poison_outputs():
        assert_close_fp32(fused(logits, labels, up, temperature=temperature),
                          exact(logits, labels, up, temperature=temperature))


BAD = [
    ("logits", lambda x, y: fastrlhf.logprobs(x.long(), y), TypeError),
    ("logits", lambda x, y: fastrlhf.logprobs(x[0, 0], y), ValueError),
    ("labels", lambda x, y: fastrlhf.logprobs(x, y.float()), TypeError),
    ("labels", lambda x, y: fastrlhf.logprobs(x, y[:-1]), ValueError),
    ("labels", lambda x, y: fastrlhf.logprobs(x, y.clamp(max=9) + 1), ValueError),    # label == V
    ("labels", lambda x, y: fastrlhf.logprobs(x, y - 20), ValueError),               # negative label
    ("temperature", lambda x, y: fastrlhf.logprobs(x, y, temperature=0.0), ValueError),
    ("temperature", lambda x, y: fastrlhf.logprobs(x, y, temperature=-torch.ones(4)), ValueError),
    ("temperature", lambda x, y: fastrlhf.logprobs(x, y, temperature=torch.ones(3)), ValueError),
    ("temperature", lambda x, y: fastrlhf.logprobs(x, y, temperature=torch.ones(4, dtype=torch.int64)), TypeError),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(kernel_backend, name, call, error):
    logits, labels = inputs(4, 10, seed=19)
    with pytest.raises(error, match=name):
        call(logits, labels)


def test_cpp_kernel_rejects_out_of_range_labels_itself():
    """Under torch.compile the Python label check is skipped: the C++ kernel refuses to read out of bounds."""
    logits, labels = inputs(3, 10, seed=20)
    labels[1] = 10
    with pytest.raises(RuntimeError, match="labels: expected values in"):
        torch.ops.fastrlhf.logprobs_forward(logits, labels, torch.ones(3), None, IGNORE, 0, 10, False)


def test_row_loop_reference_matches_log_softmax_reference():
    logits, labels = inputs(6, 400, dtype=F64, seed=22)
    logits[0, :100] = -math.inf
    for temperature in (0.7, torch.rand(6, dtype=F64) + 0.5):
        got = reference.selective_logprobs(logits, labels, temperature=temperature, return_entropy=True)
        want = reference.logprobs(logits, labels, temperature=temperature, return_entropy=True)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)


def kept_inputs(rows, V, seed):
    """Logits, labels, ``[N]`` fp32 1/T and thresholds on ``z = x / T``: per row a threshold between two
    distinct values of z (k tokens kept), none (-inf), one tied with every logit (all kept), one just above
    the label (label outside the kept set) and one above the row's max (nothing kept); row 3 is ignored."""
    logits, labels = inputs(rows, V, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    inv_temp = (0.5 + torch.rand(rows, generator=g)).reciprocal()
    inv_temp[2] = 1.0
    z = logits.double() * inv_temp.double()[:, None]
    threshold = torch.empty(rows, dtype=F64)
    for row in range(rows):
        values = z[row].sort(descending=True).values
        gaps = values[:-1] - values[1:] > 1e-3
        k = int(torch.randint(0, V, (), generator=g))
        k = k + int(gaps[k:].nonzero()[0]) if V > 1 and gaps[k:].any() else V - 1
        threshold[row] = (values[k] + values[k + 1]) / 2 if k + 1 < V else values[-1] - 1.0
    threshold[0] = -math.inf
    threshold[2] = logits[2, 0]                                # every logit equals it: all kept (ties are in)
    if rows > 4:
        above = z[4][z[4] > z[4, labels[4]]]
        threshold[4] = (z[4, labels[4]] + above.min()) / 2 if above.numel() else math.inf
    if rows > 5:
        threshold[5] = z[5].max() + 1.0                        # nothing kept
    return logits, labels, inv_temp, threshold.float()


def kept_exact(logits, labels, inv_temp, threshold, upstream):
    """float64 reference of the kept set: logits whose z is below the threshold masked with -inf; rows whose
    label is masked get log-prob -inf and a zero gradient row."""
    x = logits.double().requires_grad_()
    z = x * inv_temp.double()[:, None]
    z = z.masked_fill(z < threshold.double()[:, None], -math.inf)
    logp, entropy = reference.logprobs(z, labels, return_entropy=True)
    empty = (z == -math.inf).all(1)  # nothing kept: log-prob -inf, entropy 0
    logp, entropy = logp.masked_fill(empty, -math.inf), entropy.masked_fill(empty, 0.0)
    excluded = (logp == -math.inf)[:, None]
    up = [u.double().masked_fill(excluded[:, 0], 0.0) for u in upstream]
    grad = torch.autograd.grad((logp.masked_fill(excluded[:, 0], 0.0) * up[0]).sum() + (entropy * up[1]).sum(),
                               x)[0]
    return logp.detach(), entropy.detach(), grad


def kept_fused(logits, labels, inv_temp, threshold, upstream, inplace=False):
    x = logits.clone().requires_grad_()
    y = x * 1.0 if inplace else x
    logp, entropy, _ = torch.ops.fastrlhf.logprobs_forward(y, labels, inv_temp, threshold, IGNORE, 0,
                                                            logits.shape[1], inplace)
    grad = torch.autograd.grad((logp * upstream[0]).sum() + (entropy * upstream[1]).sum(), x)[0]
    return logp.detach(), entropy.detach(), grad


@pytest.mark.parametrize("V", [2, 37, 4097, 9000])
@pytest.mark.parametrize("inplace", [False, True])
def test_kept_set_threshold_matches_masked_reference(kernel_backend, V, inplace):
    logits, labels, inv_temp, threshold = kept_inputs(7, V, seed=V)
    up = upstream_for(labels)
    got = kept_fused(logits, labels, inv_temp, threshold, up, inplace)
    want = kept_exact(logits, labels, inv_temp, threshold, up)
    assert_close_fp32(got, want)
    if V > 2:
        assert got[0][4] == got[0][5] == -math.inf, "labels outside the kept set"
        assert (got[2][[4, 5]] == 0).all(), "their rows get no gradient"
        assert got[1][5] == 0 and got[2][5].eq(0).all()
    outside = logits.double() * inv_temp.double()[:, None] < threshold.double()[:, None]
    assert outside.any() and (got[2][outside] == 0).all(), "exactly 0 outside the kept set"


def test_kept_set_threshold_float64_gradcheck(kernel_backend):
    logits, labels, inv_temp, threshold = kept_inputs(12, 9, seed=31)
    logits, inv_temp, threshold = logits.double(), inv_temp.double(), threshold.double()
    threshold[2] = -math.inf  # gradcheck moves the tied logits across a tied threshold
    # Finite differences of a -inf log-prob are NaN: only rows whose label is kept.
    rows = (logits * inv_temp[:, None]).gather(1, labels.clamp(min=0)[:, None])[:, 0] >= threshold
    logits, labels, inv_temp, threshold = logits[rows], labels[rows], inv_temp[rows], threshold[rows]
    assert len(labels) > 5 and (threshold > -math.inf).sum() > 3
    torch.autograd.gradcheck(
        lambda x: torch.ops.fastrlhf.logprobs_forward(x, labels, inv_temp, threshold, IGNORE, 0, 9, False)[:2],
        (logits.clone().requires_grad_(),))


def test_nan_logit_poisons_its_row_only(kernel_backend):
    """A NaN logit in the first tile, a later tile or the tail (past the last full vector step) makes its row's
    log-prob, entropy and gradient NaN, as plain torch does; the other rows are exact."""
    V = 9000
    logits, labels = inputs(6, V, seed=40)
    labels[3] = 7  # row 3 of inputs() is ignored; here every row counts
    logits[0, 0] = math.nan
    logits[1, 5000] = math.nan
    logits[2, V - 3] = math.nan
    logits[4] = -math.inf
    logits[4, 4100] = math.nan      # NaN among -inf only: no finite max to hide behind
    up = upstream_for(labels)
    logp, entropy, grad = fused(logits, labels, up)
    poisoned = [0, 1, 2, 4]
    assert logp[poisoned].isnan().all() and entropy[poisoned].isnan().all()
    assert grad[poisoned].isnan().all()
    clean = [3, 5]
    assert_close_fp32((logp[clean], entropy[clean], grad[clean]),
                      exact(logits[clean], labels[clean], (up[0][clean], up[1][clean])))


def test_unchecked_values_poison_instead_of_syncing(kernel_backend, monkeypatch):
    """Where values are not checked on the host (CUDA by default, torch.compile), a temperature <= 0 gives its
    row NaN outputs, and an out-of-range label NaN outputs and a NaN gradient row (Triton) or a RuntimeError
    naming the label and row (C++)."""
    from fastrlhf import checks
    monkeypatch.setattr(checks, "values_checked", lambda t: False)
    logits, labels = inputs(4, 50, seed=41)
    temperature = torch.tensor([1.0, 0.0, -2.0, 0.7])
    up = upstream_for(labels)
    logp, entropy, grad = fused(logits, labels, up, temperature=temperature)
    assert logp[[1, 2]].isnan().all() and entropy[[1, 2]].isnan().all() and grad[[1, 2]].isnan().all()
    assert logp[[0]].isfinite().all() and grad[0].isfinite().all()
    labels[2] = 50
    if kernel_backend == "cpp":
        with pytest.raises(RuntimeError, match="labels: expected values in .* got 50 at row 2"):
            fused(logits, labels, up)
        return
    logp, entropy, grad = fused(logits, labels, up)
    assert logp[2].isnan() and entropy[2].isnan() and grad[2].isnan().all()
    keep = [0, 1, 3]
    assert_close_fp32((logp[keep], entropy[keep], grad[keep]), exact(logits[keep], labels[keep], (up[0][keep], up[1][keep])))


@pytest.mark.parametrize("inplace", [False, True])
def test_sliced_logits_are_not_copied(kernel_backend, inplace):
    """The shifted logits every trainer passes, ``logits[:, :-1, :]``, are read (and written in place) where
    they lie: the kernels take the batch and time strides."""
    B, T, V = 3, 5, 300
    full, labels = inputs(B * T, V, seed=42)
    full, labels = full.view(B, T, V), labels.view(B, T)[:, :-1].contiguous()
    want = exact(full[:, :-1].reshape(-1, V), labels.reshape(-1), [u.reshape(-1) for u in upstream_for(labels)])
    base = full.clone().requires_grad_()
    x = base * 1.0
    sliced = x[:, :-1, :]
    from fastrlhf.ops.logprobs_local import rows_view
    assert rows_view(sliced).data_ptr() == sliced.data_ptr()
    logp, entropy = fastrlhf.logprobs(sliced, labels, return_entropy=True, inplace_backward=inplace)
    up = upstream_for(labels)
    (grad,) = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), sliced)
    if inplace:
        assert grad.data_ptr() == sliced.data_ptr(), "the gradient is written into the sliced view itself"
        assert (x[:, -1] == full[:, -1]).all(), "the last time step (not part of the view) is untouched"
    assert_close_fp32((logp.reshape(-1), entropy.reshape(-1), grad.reshape(-1, V)), want)


def _direct_args(V=10, rows=3):
    logits, labels = inputs(rows, V, seed=43)
    f = torch.zeros(rows)
    return dict(logits=logits, labels=labels, inv_temp=torch.ones(rows), threshold=None, lse=f.clone(),
                entropy=f.clone(), grad_logp=f.clone(), grad_entropy=f.clone(), grad_logits=torch.empty_like(logits))


BAD_DIRECT = [
    ("labels", dict(labels=lambda a: a["labels"].int())),
    ("inv_temp", dict(inv_temp=lambda a: a["inv_temp"].double())),
    ("threshold", dict(threshold=lambda a: torch.zeros(2))),
    ("lse", dict(lse=lambda a: torch.zeros(4))),
    ("entropy", dict(entropy=lambda a: torch.zeros(3, dtype=torch.float64))),
    ("grad_logp", dict(grad_logp=lambda a: torch.zeros(6)[::2])),
    ("grad_entropy", dict(grad_entropy=lambda a: torch.zeros(2))),
    ("grad_logits", dict(grad_logits=lambda a: a["grad_logits"].double())),
    ("grad_logits", dict(grad_logits=lambda a: torch.empty(3, 11))),
    ("grad_logits", dict(grad_logits=lambda a: torch.empty(10, 3).t())),
    ("logits", dict(logits=lambda a: a["logits"].t().contiguous().t())),
    ("extras", dict(extras=lambda a: torch.empty(3, 2))),
    ("extras", dict(extras=lambda a: torch.empty(3, 3, dtype=torch.float64))),
]


@pytest.mark.parametrize("name,change", BAD_DIRECT, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_DIRECT)])
def test_cpp_ops_check_every_tensor_they_read(name, change):
    """Direct calls of the C++ ops (no Python checks) refuse bad tensors with an error naming them."""
    a = _direct_args()
    a.update({k: fn(a) for k, fn in change.items()})
    ops = backend.cpp_ops()
    with pytest.raises(RuntimeError, match=f"^{name}: "):  # the kernel's own check, not a schema error
        if name in ("lse", "entropy", "grad_logp", "grad_entropy", "grad_logits") or name == "threshold":
            ops.logprobs_backward(a["logits"], a["labels"], a["inv_temp"], a["threshold"], a["lse"], a["entropy"],
                                  a["grad_logp"], a["grad_entropy"], IGNORE, 0, 10, a["grad_logits"])
        else:
            ops.logprobs_forward(a["logits"], a["labels"], a["inv_temp"], a["threshold"], IGNORE, 0, 10,
                                 a["lse"], a["entropy"], a["grad_logp"], a.get("extras"))


@pytest.mark.parametrize("V", [5, 70, 9000])
def test_extras_from_the_same_pass(kernel_backend, V):
    """TRL's optional outputs, written by the forward kernel itself: log sum p^2, the mean of z = x / T and
    whether the label is the first arg-max (a tie with an earlier column is not top-1, as torch.argmax),
    against float64 torch; ties from quantised logits, labels in the first and last tile, an ignored row."""
    from fastrlhf.ops.logprobs_local import forward_local

    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(8, V, generator=g, dtype=torch.float64) * 2).round()  # many ties
    labels = logits.argmax(-1)
    labels[1] = V - 1
    labels[2] = 0
    labels[3] = -100
    row_max = logits.amax(-1, keepdim=True)
    logits[4, V - 1] = row_max[4, 0]  # a late tie with the row max, the label the last of them
    labels[4] = V - 1
    logits[5, : V // 2] = -math.inf
    inv_temp = torch.full((8,), 1 / 0.7, dtype=torch.float64)
    extras = torch.full((3, 8), math.nan, dtype=torch.float32)
    forward_local(logits.float(), labels, inv_temp.float(), None, -100, 0, V, extras)
    z = logits / 0.7
    p = z.softmax(-1)
    want = torch.stack([(p * p).sum(-1).log(), z.mean(-1), (z.argmax(-1) == labels).double()])
    want[:, 3] = 0
    torch.testing.assert_close(extras.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("V", [9000, 20000])
def test_triton_splits_the_vocabulary_when_rows_are_few(monkeypatch, V):
    """With fewer rows than programs to fill the GPU, the Triton forward splits each row's vocabulary over
    several programs and combines their (m, s, u) in order: the same results, NaN rows, -inf rows, ignored
    rows, kept-set thresholds and strided rows included."""
    from fastrlhf.kernels import logprobs as kernels

    monkeypatch.setattr(kernels, "MIN_PROGRAMS", 10**6)
    assert kernels.split_layout(6, V)[0] >= 2
    logits, labels = inputs(6, V, seed=41)
    labels[3] = 7
    logits[1, V - 5] = math.nan
    logits[2, : V // 2] = -math.inf
    labels[4] = -100
    up = upstream_for(labels)
    with fastrlhf.use_backend("triton"):
        logp, entropy, grad = fused(logits, labels, up)
        shifted = logits.view(2, 3, V)[:, :2]
        strided = fastrlhf.logprobs(shifted, labels.view(2, 3)[:, :2], temperature=0.7, return_entropy=True)
        kept = fastrlhf.logprobs(logits, labels.clamp_min(0), top_k=40, top_p=0.9, return_entropy=True)
    assert logp[1].isnan() and entropy[1].isnan() and grad[1].isnan().all()
    clean = [0, 2, 3, 4, 5]
    assert_close_fp32((logp[clean], entropy[clean], grad[clean]),
                      exact(logits[clean], labels[clean], (up[0][clean], up[1][clean])))
    want = reference.logprobs(shifted.double(), labels.view(2, 3)[:, :2], temperature=0.7, return_entropy=True)
    for got, expected in zip(strided, want):  # row 1 holds the NaN
        torch.testing.assert_close(got.double(), expected, equal_nan=True, atol=1e-5, rtol=1e-5)
    want_kept = reference.logprobs(logits.double(), labels.clamp_min(0), top_k=40, top_p=0.9, return_entropy=True)
    for got, expected in zip(kept, want_kept):
        torch.testing.assert_close(got.double(), expected, equal_nan=True, atol=1e-5, rtol=1e-5)
