"""Triton kernel of ``fastrlhf.sampling_threshold``: one program per row, a 16-way search over keys.

The kept set after min-p, top-k and top-p is ``z >= threshold`` (semantics in
``fastrlhf/ops/sampling_threshold.py``). With the order-preserving integer key of ``z`` (the float's bits,
the non-sign bits flipped for negatives; -0 read as +0), both searches find the largest key ``K`` with
``W(key >= K) >= target``:
- top-k: ``W`` counts the values above the min-p floor, ``target = k``: ``K`` is the k-th largest;
- top-p: ``W`` sums ``exp(z - max)`` over the values top-k kept, ``target = top_p * W(all kept)``: ``K``
  is the smallest value whose strictly larger kept values hold less than ``top_p`` of the mass.
Each search pass reads the row once and weighs 16 evenly spaced pivots of the remaining key range
``[lo, hi]`` at once (a ``[16, BLOCK_V]`` compare), then narrows the range 16-fold around the largest
pivot that reaches the target: 8 passes over the 2^32 fp32 keys (16 for fp64), no sort, no scratch.

Passes over the row: one for the max (NaN check), and per active filter one weighing pass plus the
search passes, so at most 1 + 2 x 9 reads of ``V`` elements (1 + 2 x 17 for fp64 keys). Bytes-moved floor:
the row once from HBM, ``2V`` (bf16) or ``4V`` (fp32) bytes, plus 4 bytes of threshold. The later passes
hit L2 only while the rows of the programs in flight fit in it (2 programs per SM x 132 SMs x 64 KiB =
17 MiB for a 32k-vocab bf16 row: yes; x 297 KiB for 152k bf16 = 78 MiB, above H100/H200's 50 MiB: no, up
to 19 row reads from HBM). Each search pass also costs 16 compare-selects per element (``[16, BLOCK_V]``),
so with both filters on the kernel is ALU-bound, not memory-bound; a radix select with per-row histograms
(as the C++ kernel) would cut both. One program per row: the grid fills the SMs from about 264 rows.
Offsets are int64; no host syncs (the grid is the row count). A NaN logit in a filtered row, or invalid
parameters, give a NaN threshold.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_V = 1024
PIVOTS = 16
LOG_PIVOTS = 4
NUM_WARPS = 8


@triton.jit
def _key(z, IS_FP64: tl.constexpr):
    """The order-preserving int64 key of ``z``."""
    z = tl.where(z == 0, tl.zeros_like(z), z)  # -0 and +0 share a key
    if IS_FP64:
        bits = z.to(tl.int64, bitcast=True)
        return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        bits = z.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _value(key, IS_FP64: tl.constexpr):
    """The float whose key is ``key`` (the key map is its own inverse on the bits)."""
    if IS_FP64:
        return (key ^ ((key >> 63) & 0x7FFFFFFFFFFFFFFF)).to(tl.float64, bitcast=True)
    else:
        bits = key.to(tl.int32)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _weights(x_row, start, V, inv_t, m, min_key, BY_MASS: tl.constexpr, IS_FP64: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """Keys of one tile and their weights: 1 (or exp(z - m)) for values with key >= min_key, else 0."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    cols = start + tl.arange(0, BLOCK_V)
    inside = cols < V
    z = tl.load(x_row + cols, mask=inside, other=-float("inf")).to(ACC) * inv_t
    key = _key(z, IS_FP64)
    counted = inside & (key >= min_key)
    if BY_MASS:
        w = tl.where(counted, tl.exp(z - m), 0.0)
    else:
        w = counted.to(tl.int32)
    return key, w


@triton.jit
def _weight_from(x_row, V, inv_t, m, min_key, BY_MASS: tl.constexpr, IS_FP64: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """W(key >= min_key) over the row."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    total = tl.zeros([], ACC if BY_MASS else tl.int32)
    for start in range(0, V, BLOCK_V):
        _, w = _weights(x_row, start, V, inv_t, m, min_key, BY_MASS, IS_FP64, BLOCK_V)
        total += tl.sum(w, axis=0)
    return total


@triton.jit
def _largest_key(x_row, V, inv_t, m, lo, hi, target, BY_MASS: tl.constexpr, IS_FP64: tl.constexpr,
                 BLOCK_V: tl.constexpr, PIVOTS: tl.constexpr, LOG_PIVOTS: tl.constexpr):
    """The largest key K in [lo, hi] with W(key >= K) >= target, where W(key >= lo) >= target and W counts
    only keys >= lo."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    j = tl.arange(0, PIVOTS).to(tl.int64)
    min_key = lo
    while lo < hi:
        # PIVOTS * step > hi - lo, so the pivots lo + j * step cover the range, and step - 1 < hi - lo, so the
        # range shrinks even when only lo reaches the target. The blocks' difference d cannot overflow (hi - lo
        # can, for fp64 keys); d <= 1 means hi - lo < 2 * PIVOTS, exact. (d + 1 alone stalled at
        # hi = lo + 1 across a block boundary: heavy ties.)
        d = (hi >> LOG_PIVOTS) - (lo >> LOG_PIVOTS)
        step = tl.where(d <= 1, ((hi - lo) >> LOG_PIVOTS) + 1, d + 1)
        pivots = lo + j * step
        weight = tl.zeros([PIVOTS], ACC if BY_MASS else tl.int32)
        for start in range(0, V, BLOCK_V):
            key, w = _weights(x_row, start, V, inv_t, m, min_key, BY_MASS, IS_FP64, BLOCK_V)
            weight += tl.sum(tl.where(key[None, :] >= pivots[:, None], w[None, :], 0), axis=1)
        reached = (pivots <= hi) & (weight >= target)
        best = tl.max(tl.where(reached, j, 0), axis=0)  # pivot 0 = lo always reaches the target
        lo = lo + best * step
        hi = tl.minimum(hi, lo + step - 1)
    return lo


@triton.jit
def sampling_threshold_kernel(x_ptr, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr, stride_row, V,
                              BLOCK_V: tl.constexpr, PIVOTS: tl.constexpr, LOG_PIVOTS: tl.constexpr):
    IS_FP64: tl.constexpr = x_ptr.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    use_k = (top_k > 0) & (top_k < V)
    use_p = ~(top_p >= 1)
    use_min_p = min_p > 0
    threshold = tl.full([], -float("inf"), ACC)
    if use_k | use_p | use_min_p:
        inv_t = tl.load(inv_temp_ptr + row)
        x_row = x_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([], -float("inf"), ACC)
        nans = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK_V):
            z = tl.load(x_row + start + cols, mask=start + cols < V, other=-float("inf")).to(ACC) * inv_t
            m = tl.maximum(m, tl.max(z, axis=0))  # tl.max drops NaN: counted apart
            nans += tl.sum((z != z).to(tl.int32), axis=0)
        invalid = (nans > 0) | (top_p != top_p) | (top_p < 0) | (min_p != min_p) | (min_p > 1)
        if invalid:
            threshold = tl.full([], float("nan"), ACC)
        elif m > -float("inf"):  # a row of only -inf logits has nothing to filter
            floor = tl.where(use_min_p, m + tl.log(min_p.to(ACC)), -float("inf"))
            threshold = floor
            if use_p & (top_p <= 0):
                threshold = m  # top-p 0 keeps the most likely tokens only (ties whole)
            elif use_k | use_p:
                top_key = _key(m, IS_FP64)
                kept_key = _key(floor, IS_FP64)
                if use_k:
                    if _weight_from(x_row, V, inv_t, m, kept_key, False, IS_FP64, BLOCK_V) > top_k:
                        kept_key = _largest_key(x_row, V, inv_t, m, kept_key, top_key, top_k.to(tl.int32), False,
                                                IS_FP64, BLOCK_V, PIVOTS, LOG_PIVOTS)
                if use_p:
                    total = _weight_from(x_row, V, inv_t, m, kept_key, True, IS_FP64, BLOCK_V)
                    kept_key = _largest_key(x_row, V, inv_t, m, kept_key, top_key, top_p.to(ACC) * total, True,
                                            IS_FP64, BLOCK_V, PIVOTS, LOG_PIVOTS)
                threshold = tl.maximum(floor, _value(kept_key, IS_FP64))
    tl.store(out_ptr + row, threshold)


def sampling_threshold(logits, inv_temp, top_k, top_p, min_p, threshold):
    """Launches the kernel; arguments as the C++ op ``fastrlhf_cpp::sampling_threshold`` (checked in Python)."""
    rows, V = logits.shape
    if rows == 0:
        return
    sampling_threshold_kernel[(rows,)](logits, inv_temp, top_k, top_p, min_p, threshold, logits.stride(0), V,
                                       BLOCK_V=_block(V), PIVOTS=PIVOTS, LOG_PIVOTS=LOG_PIVOTS, num_warps=NUM_WARPS)


def _block(V: int) -> int:
    return min(BLOCK_V, max(16, triton.next_power_of_2(V)))


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: ``fastrlhf.logprobs`` with the sampler's filters
    (top-k, top-p and min-p together, per-row top-p) on fp32 and bf16 logits, and ``fastrlhf.linear_logprobs``
    with them in chunks of 13 tokens (thresholds written into slices not 16-byte aligned), so the compiled
    variants are those these launch."""
    import torch

    import fastrlhf

    def launch(dtype):
        def run():
            logits = torch.randn(4, 32000).to(dtype).requires_grad_()
            logp = fastrlhf.logprobs(logits, torch.randint(0, 32000, (4,)), temperature=0.7, top_k=50,
                                     top_p=torch.tensor([0.9, 0.95, 1.0, 0.5]), min_p=0.05)
            torch.autograd.grad(logp.sum(), logits)
        return run

    def linear(dtype):
        def run():
            hidden = torch.randn(40, 64).to(dtype).requires_grad_()
            weight = torch.randn(32000, 64).to(dtype).requires_grad_()
            logp = fastrlhf.linear_logprobs(hidden, weight, torch.randint(0, 32000, (40,)), top_k=50, top_p=0.9,
                                            chunk_size=13)
            torch.autograd.grad(logp.sum(), (hidden, weight))
        return run

    return [(f"{op} top_k+top_p+min_p V=32000 {str(dtype).removeprefix('torch.')}", make(dtype))
            for op, make in (("logprobs", launch), ("linear_logprobs N=40 chunk 13", linear))
            for dtype in (torch.float32, torch.bfloat16)]
