"""fastrlhf.sampling_threshold against vLLM's sort-based filters (float64 reference), on both kernels.

The kernels return one threshold per row; the check is that ``z >= threshold`` is exactly the kept set
of the sort-based reference (min-p, then top-k, then top-p, ties at the top-p boundary kept whole).
"""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import backend, reference
from fastrlhf.ops.sampling_threshold import sampling_threshold
from fastrlhf.reference.sampling_threshold import kept_mask

F64 = torch.float64


def logits_for(rows, V, dtype=F64, seed=0, scale=3.0, quantum=None):
    """Random logits; ``quantum`` rounds them to multiples of it (heavy ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g, dtype=F64) * scale
    if quantum is not None:
        x = (x / quantum).round() * quantum
    return x.to(dtype)


def kernel_z(logits, temperature):
    """z as the kernels compute it: the logits upcast, times 1/T rounded to the compute dtype."""
    compute = F64 if logits.dtype == F64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        inv_temp = temperature.to(compute).reciprocal().expand(logits.shape[:-1])
    else:
        inv_temp = torch.tensor(1.0 / temperature, dtype=compute)
    return logits.to(compute) * inv_temp[..., None]


def assert_kept_as_reference(logits, temperature=1.0, **filters):
    """``z >= threshold`` equals the reference's kept set, z computed as the kernels compute it."""
    threshold = sampling_threshold(logits, temperature=temperature, **filters)
    assert threshold.dtype == (F64 if logits.dtype == F64 else torch.float32)
    assert threshold.shape == logits.shape[:-1]
    z = kernel_z(logits, temperature)
    want = kept_mask(z.double(), **filters)
    got = z >= threshold[..., None]
    bad = (got != want).any(-1)
    assert not bad.any(), f"rows {bad.nonzero().flatten().tolist()} differ: thresholds {threshold[bad].tolist()}"
    return threshold


FILTERS = [
    dict(top_k=5), dict(top_k=1), dict(top_p=0.9), dict(top_p=0.3), dict(min_p=0.05), dict(min_p=0.5),
    dict(top_k=50, top_p=0.9, min_p=0.05), dict(top_k=20, top_p=0.5), dict(top_p=0.8, min_p=0.1),
    dict(top_k=3, min_p=0.2), dict(top_p=0.0), dict(min_p=1.0), dict(top_k=10**9, top_p=1.0, min_p=0.0),
]


@pytest.mark.parametrize("filters", FILTERS, ids=[str(f) for f in FILTERS])
@pytest.mark.parametrize("V", [1, 7, 1000, 2049])
def test_matches_sort_reference(kernel_backend, filters, V):
    if kernel_backend == "triton" and (V != 2049 or filters not in FILTERS[5:8]):
        pytest.skip("the interpreter is slow: Triton runs the combined filters on a multi-tile vocabulary")
    rows = 2 if kernel_backend == "triton" else 8
    assert_kept_as_reference(logits_for(rows, V, seed=V), temperature=0.7, **filters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_logits_decided_in_fp32(kernel_backend, dtype):
    if kernel_backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16")
    rows = 3 if kernel_backend == "triton" else 8
    assert_kept_as_reference(logits_for(rows, 1500, dtype=dtype, seed=1), temperature=1.3, top_k=40, top_p=0.85,
                             min_p=0.02)


@pytest.mark.parametrize("quantum", [0.5, 2.0])
@pytest.mark.parametrize("filters", [dict(top_k=7), dict(top_p=0.6), dict(top_k=30, top_p=0.95, min_p=0.01)],
                         ids=["top_k", "top_p", "all"])
def test_heavy_ties(kernel_backend, quantum, filters):
    """Quantised logits: the k-th value and the top-p boundary sit inside large tie groups, kept whole."""
    rows = 3 if kernel_backend == "triton" else 10
    logits = logits_for(rows, 600, seed=2, quantum=quantum)
    threshold = assert_kept_as_reference(logits, **filters)
    if "top_k" in filters and "top_p" not in filters:
        kept = (logits >= threshold[:, None]).sum(-1)
        assert (kept >= filters["top_k"]).all() and (kept > filters["top_k"]).any(), "ties with the k-th are kept"


def test_one_token_holds_almost_all_mass(kernel_backend):
    logits = logits_for(3, 800, seed=3)
    logits[:, 17] += 40.0
    for filters in (dict(top_p=0.9), dict(min_p=0.05), dict(top_k=50, top_p=0.99, min_p=1e-12)):
        threshold = assert_kept_as_reference(logits, **filters)
        assert ((logits >= threshold[:, None]).sum(-1) == 1).all()


def test_minus_inf_logits(kernel_backend):
    """Padded vocabularies and earlier masks: -inf tokens are never kept by a filter; a row of only -inf
    has nothing to filter (threshold -inf)."""
    logits = logits_for(4, 900, seed=4)
    logits[:, 850:] = -math.inf
    logits[1, :845] = -math.inf        # five finite values left: top-k 20 reaches into the -inf ones
    logits[2] = -math.inf
    threshold = assert_kept_as_reference(logits, top_k=20)
    assert threshold[1] == -math.inf and threshold[2] == -math.inf
    threshold = assert_kept_as_reference(logits, top_p=0.95, min_p=0.01)
    assert threshold[2] == -math.inf and threshold[[0, 1, 3]].isfinite().all()


def test_per_row_parameters(kernel_backend):
    """Per-sequence tensors broadcast over tokens; each filter switched off in some rows."""
    logits = logits_for(6, 500, seed=5).view(2, 3, 500)
    top_k = torch.tensor([[0], [25]])
    top_p = torch.tensor([[1.0, 0.7, 0.2], [0.9, 1.5, 0.0]], dtype=F64)
    min_p = torch.tensor([0.0, 0.05, 0.3], dtype=F64)
    temperature = torch.tensor([[0.6], [1.4]], dtype=F64)
    assert_kept_as_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def test_no_filter_is_minus_inf_and_nan_rows(kernel_backend):
    logits = logits_for(3, 300, seed=6)
    assert (sampling_threshold(logits) == -math.inf).all()
    assert (sampling_threshold(logits, top_k=0, top_p=1.0, min_p=0.0) == -math.inf).all()
    logits[1, 7] = math.nan
    threshold = sampling_threshold(logits, top_p=0.9)
    assert threshold[1].isnan() and threshold[[0, 2]].isfinite().all()
    assert sampling_threshold(logits, top_k=0)[1] == -math.inf  # no filter: the row is not read


def test_invalid_parameters_poison_the_row_in_the_kernels(kernel_backend):
    """Parameters the host did not check (CUDA, compiled) give NaN thresholds, never a finite answer."""
    logits = logits_for(4, 100, seed=7)
    inv_temp = torch.ones(4, dtype=F64)
    top_k = torch.zeros(4, dtype=torch.int64)
    top_p = torch.tensor([0.5, -0.1, math.nan, 0.5], dtype=F64)
    min_p = torch.tensor([0.0, 0.0, 0.0, 1.5], dtype=F64)
    threshold = torch.ops.fastrlhf.sampling_threshold(logits, inv_temp, top_k, top_p, min_p)
    assert threshold[0].isfinite() and threshold[1:].isnan().all()


def test_strided_rows(kernel_backend):
    wide = logits_for(4, 700, seed=8)
    assert_kept_as_reference(wide[:, 50:650], top_k=30, top_p=0.8)


def test_batch_invariance(kernel_backend):
    logits = logits_for(6, 400, seed=9)
    threshold = sampling_threshold(logits, top_k=15, top_p=0.9, min_p=0.02)
    assert torch.equal(sampling_threshold(logits[[4, 1]], top_k=15, top_p=0.9, min_p=0.02), threshold[[4, 1]])


def test_reference_backend():
    logits = logits_for(5, 300, seed=10)
    with backend.use_backend("reference"):
        assert_kept_as_reference(logits, top_k=12, top_p=0.7, min_p=0.03)


def test_opcheck(kernel_backend):
    logits = logits_for(4, 37, dtype=torch.float32, seed=11)
    args = (logits, torch.full((4,), 1.25), torch.tensor([3, 0, 40, 5]), torch.tensor([0.9, 0.5, 1.0, 2.0]),
            torch.tensor([0.0, 0.1, 0.05, 0.0]))
    torch.library.opcheck(torch.ops.fastrlhf.sampling_threshold, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    logits = logits_for(6, 300, dtype=torch.float32, seed=12)
    top_p = torch.tensor([0.9, 0.8, 1.0, 0.5, 0.95, 0.7])

    @torch.compile(fullgraph=True, backend=compiler)
    def threshold(x, top_p):
        return sampling_threshold(x, temperature=0.9, top_k=40, top_p=top_p, min_p=0.01)

    torch.testing.assert_close(threshold(logits, top_p),
                               sampling_threshold(logits, temperature=0.9, top_k=40, top_p=top_p, min_p=0.01))


BAD = [
    ("top_k", dict(top_k=2.5), TypeError),
    ("top_k", dict(top_k=torch.ones(4)), TypeError),
    ("top_k", dict(top_k=torch.ones(3, dtype=torch.int64)), ValueError),
    ("top_p", dict(top_p=-0.1), ValueError),
    ("top_p", dict(top_p=torch.tensor([0.5, math.nan, 0.5, 0.5])), ValueError),
    ("top_p", dict(top_p=torch.tensor([1, 1, 1, 1])), TypeError),
    ("top_p", dict(top_p="0.9"), TypeError),
    ("min_p", dict(min_p=1.5), ValueError),
    ("min_p", dict(min_p=torch.full((4,), -0.2)), ValueError),
    ("temperature", dict(top_k=3, temperature=0.0), ValueError),
]


@pytest.mark.parametrize("name,filters,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(kernel_backend, name, filters, error):
    with pytest.raises(error, match=name):
        sampling_threshold(logits_for(4, 10, dtype=torch.float32, seed=13), **filters)


@pytest.mark.parametrize("name,args", [
    ("top_k", lambda a: (*a[:2], a[2].int(), *a[3:])),
    ("top_p", lambda a: (*a[:3], a[3][:2], a[4])),
    ("min_p", lambda a: (*a[:4], a[4].double())),
    ("inv_temp", lambda a: (a[0], torch.ones(8)[::2], *a[2:])),
    ("logits", lambda a: (a[0].t(), *a[1:])),
])
def test_cpp_op_checks_its_arguments(name, args):
    good = (logits_for(4, 4, dtype=torch.float32), torch.ones(4), torch.zeros(4, dtype=torch.int64),
            torch.full((4,), 0.5), torch.zeros(4))
    with pytest.raises(RuntimeError, match=name):
        torch.ops.fastrlhf_cpp.sampling_threshold(*args(good), torch.empty(4))


def test_public_export():
    assert fastrlhf.sampling_threshold is sampling_threshold
    assert reference.sampling_threshold is not None
