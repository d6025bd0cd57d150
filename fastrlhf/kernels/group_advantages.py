"""Triton kernels of ``fastrlhf.group_advantages``, launched without a host sync.

The launcher ``group_advantages`` takes the C++ op's arguments and runs up to four kernels:

1. ``row_scores_kernel`` (token input ``[B, T]``): each row's score (the sum of its rewards at masked-in
   tokens) and length, in float64, per-lane partial sums added in a fixed order. Floor: one read of the
   rewards and the mask, ``B * T * (itemsize + 1)`` bytes.
2. Grouping: ``torch.sort(index, stable=True)`` on the device (a radix sort, no sync), so each group is a
   run of the sorted ids with its members in row order. ``torch.unique`` would sync (its output size).
3. ``group_kernel``: one program per sorted position; the program at the head of a run (the first
   position of its id) owns the group: it finds the run's end, then sums the group's (shifted) scores,
   squared deviations and writes each member's advantage, in tiles aligned to the group's start, so the
   order of every sum depends on the group's members only (bit-identical results whatever other groups
   share the batch; no atomics). The other programs return at once. Floor: ~5 passes over B ids,
   rows and scores, negligible next to step 1.
   ``batch_moments_kernel`` (one program, rows in order) gives the batch std (``scale="batch"``) before
   it, and the token-weighted moments that reinforce++-baseline whitens with after it.
4. ``broadcast_kernel`` (token input): the row's advantage at masked-in tokens, 0 elsewhere. Floor: one
   read of the mask and one write of the output, ``B * T * (1 + out itemsize)`` bytes.

Inputs whose values are invalid and were not checked on the host (negative ids; a group of one with
``singleton="error"``) give NaN advantages for the rows concerned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP_BLOCK = 128
MOMENTS_BLOCK = 1024
ROWS_BLOCK_B = 4
ROWS_BLOCK_T = 256
BROADCAST_BLOCK_B = 4
BROADCAST_BLOCK_T = 512

ESTIMATORS = {"grpo": 0, "rloo": 1, "reinforce++-baseline": 2, "opo": 3}
SCALES = {"group": 0, "batch": 1, "none": 2}
SINGLETONS = {"raw": 0, "zero": 1, "error": 2}
GRPO, RLOO, REINFORCE_PP_BASELINE, OPO = range(4)
GROUP, BATCH, NONE = range(3)
RAW, ZERO, ERROR = range(3)


@triton.jit
def row_scores_kernel(r_ptr, mask_ptr, score_ptr, length_ptr, rows, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = row < rows
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_B, BLOCK_T], tl.float64)
    count = tl.zeros([BLOCK_B, BLOCK_T], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inside = live[:, None] & (t < T)[None, :]
        offset = row[:, None] * T + t[None, :]
        keep = tl.load(mask_ptr + offset, mask=inside, other=0) != 0
        r = tl.load(r_ptr + offset, mask=inside, other=0.0).to(tl.float64)
        acc += tl.where(keep, r, 0.0)  # selected, not multiplied: NaN outside the mask stays out
        count += keep.to(tl.int32)
    tl.store(score_ptr + row, tl.sum(acc, axis=1), mask=live)
    tl.store(length_ptr + row, tl.sum(count, axis=1).to(tl.float64), mask=live)


@triton.jit
def batch_moments_kernel(value_ptr, weight_ptr, moments_ptr, rows, HAS_WEIGHT: tl.constexpr,
                         IGNORE_NAN: tl.constexpr, BLOCK: tl.constexpr):
    """``[sum of weights, mean, sum of weighted squared deviations]`` over the rows of weight > 0 (without
    weights: every row, NaN rows left out with ``IGNORE_NAN``); two passes in float64, tiles in order."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float64)
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, rows, BLOCK):
        i = start + offs
        x, w = _weighted(value_ptr, weight_ptr, i, rows, HAS_WEIGHT, IGNORE_NAN)
        total += w
        acc += tl.where(w > 0, w * x, 0.0)
    count = tl.sum(total, axis=0)
    mean = tl.sum(acc, axis=0) / count
    m2 = tl.zeros([BLOCK], tl.float64)
    for start in range(0, rows, BLOCK):
        i = start + offs
        x, w = _weighted(value_ptr, weight_ptr, i, rows, HAS_WEIGHT, IGNORE_NAN)
        m2 += tl.where(w > 0, w * (x - mean) * (x - mean), 0.0)
    tl.store(moments_ptr, count)
    tl.store(moments_ptr + 1, mean)
    tl.store(moments_ptr + 2, tl.sum(m2, axis=0))


@triton.jit
def _weighted(value_ptr, weight_ptr, i, rows, HAS_WEIGHT: tl.constexpr, IGNORE_NAN: tl.constexpr):
    inside = i < rows
    x = tl.load(value_ptr + i, mask=inside, other=0.0).to(tl.float64)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + i, mask=inside, other=0.0).to(tl.float64)
    else:
        w = tl.where(inside, 1.0, 0.0).to(tl.float64)
    if IGNORE_NAN:
        w = tl.where(x != x, 0.0, w)
    return x, w


@triton.jit
def _divide(a, d):
    # a / d, with 0 for a zero denominator (no spread and eps = 0); NaN stays NaN
    return tl.where(d == 0, tl.where(a != a, a, 0.0), a / d)


@triton.jit
def _members(order_ptr, score_ptr, length_ptr, pos, end, IGNORE_NAN: tl.constexpr,
             WEIGHTED: tl.constexpr):
    """Rows, scores, validity and weights of the group members at sorted positions ``pos``."""
    inside = pos < end
    row = tl.load(order_ptr + pos, mask=inside, other=0)
    s = tl.load(score_ptr + row, mask=inside, other=0.0)
    valid = inside
    if IGNORE_NAN:
        valid = valid & (s == s)
    if WEIGHTED:
        w = tl.load(length_ptr + row, mask=inside, other=0.0)
    else:
        w = tl.where(inside, 1.0, 0.0).to(tl.float64)
    return row, s, valid, w


@triton.jit
def group_kernel(ids_ptr, order_ptr, score_ptr, length_ptr, stats_ptr, adv_ptr, weight_ptr, rows,
                 ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, SINGLETON: tl.constexpr, IGNORE_NAN: tl.constexpr,
                 UNBIASED: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64)
    my_id = tl.load(ids_ptr + start)
    prev_id = tl.load(ids_ptr + tl.maximum(start - 1, 0))
    if (start == 0) | (prev_id != my_id):
        offs = tl.arange(0, BLOCK)
        WEIGHTED: tl.constexpr = ESTIMATOR == 3
        # The run's end, and its first valid member (the shift).
        eps = tl.load(stats_ptr + 3)
        end = start
        first = start * 0 + rows
        more = start >= 0
        while more:
            pos = end + offs
            inside = pos < rows
            member = inside & (tl.load(ids_ptr + pos, mask=inside, other=0) == my_id)
            size = tl.sum(member.to(tl.int64), axis=0)
            row, s, valid, w = _members(order_ptr, score_ptr, length_ptr, pos, end + size, IGNORE_NAN,
                                        WEIGHTED)
            first = tl.minimum(first, tl.min(tl.where(valid, pos, rows), axis=0))
            end = end + size
            more = size == BLOCK
        n = tl.zeros([], tl.int64)
        total = tl.zeros([], tl.float64)
        acc = tl.zeros([], tl.float64)
        shift = tl.load(score_ptr + tl.load(order_ptr + tl.minimum(first, rows - 1)))
        for k in range(start, end, BLOCK):
            row, s, valid, w = _members(order_ptr, score_ptr, length_ptr, k + offs, end, IGNORE_NAN,
                                        WEIGHTED)
            n += tl.sum(valid.to(tl.int64), axis=0)
            total += tl.sum(tl.where(valid, w, 0.0), axis=0)
            acc += tl.sum(tl.where(valid, w * (s - shift), 0.0), axis=0)
        base = tl.where(total == 0, 0.0, acc / total)
        factor = 1.0
        if ESTIMATOR == 1:
            factor = n.to(tl.float64) / (n - 1).to(tl.float64)
        spread = tl.full([], 1.0, tl.float64)
        if ESTIMATOR == 0:
            if SCALE == 0:
                m2 = tl.zeros([], tl.float64)
                for k in range(start, end, BLOCK):
                    row, s, valid, w = _members(order_ptr, score_ptr, length_ptr, k + offs, end,
                                                IGNORE_NAN, False)
                    d = (s - shift) - base
                    m2 += tl.sum(tl.where(valid, d * d, 0.0), axis=0)
                spread = tl.sqrt(m2 / (n - UNBIASED).to(tl.float64)) + eps
            elif SCALE == 1:
                spread = _batch_std(stats_ptr, UNBIASED) + eps
        # A group of one: verl's mean 0 and std 1 ("raw"), zero, or NaN where it should have raised.
        single_spread = 1.0
        if ESTIMATOR == 0:
            if SCALE == 0:
                single_spread = 1.0 + eps
            elif SCALE == 1:
                single_spread = _batch_std(stats_ptr, UNBIASED) + eps
        for k in range(start, end, BLOCK):
            pos = k + offs
            row, s, valid, w = _members(order_ptr, score_ptr, length_ptr, pos, end, IGNORE_NAN, True)
            adv = _divide(factor * ((s - shift) - base), spread)
            if SINGLETON == 0:
                single = _divide(s, single_spread)
            elif SINGLETON == 1:
                single = s - s
            else:
                single = tl.full(s.shape, float("nan"), tl.float64)
            adv = tl.where(n == 1, single, adv)
            included = valid & ((n > 1) | (SINGLETON == 0))
            adv = tl.where(valid, adv, 0.0)
            adv = tl.where(my_id < 0, float("nan"), adv)
            inside = pos < end
            tl.store(adv_ptr + row, adv.to(adv_ptr.dtype.element_ty), mask=inside)
            tl.store(weight_ptr + row, tl.where(included, w, 0.0), mask=inside)


@triton.jit
def _batch_std(stats_ptr, UNBIASED: tl.constexpr):
    count = tl.load(stats_ptr)
    return tl.sqrt(tl.load(stats_ptr + 2) / (count - UNBIASED))


@triton.jit
def broadcast_kernel(adv_ptr, weight_ptr, moments_ptr, mask_ptr, out_ptr, rows, T, WHITEN: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = row < rows
    a = tl.load(adv_ptr + row, mask=live, other=0.0)
    if WHITEN:
        # verl's masked_whiten over the masked-in tokens of the weighted rows: unbiased var, rsqrt(var + 1e-8)
        count = tl.load(moments_ptr)
        mean = tl.load(moments_ptr + 1)
        rstd = 1.0 / tl.sqrt(tl.load(moments_ptr + 2) / (count - 1.0) + 1e-8)
        w = tl.load(weight_ptr + row, mask=live, other=0.0)
        a = tl.where(w > 0, (a - mean) * rstd, a)
    inside = live[:, None] & (t < T)[None, :]
    offset = row[:, None] * T + t[None, :]
    keep = tl.load(mask_ptr + offset, mask=inside, other=0) != 0
    value = tl.where(keep, a[:, None], 0.0)
    tl.store(out_ptr + offset, value.to(out_ptr.dtype.element_ty), mask=inside)


def group_advantages(scores, index, mask, estimator, scale, eps, unbiased, singleton, nan, out):
    """Same arguments as ``torch.ops.fastrlhf_cpp.group_advantages``: writes the advantages into ``out``.

    ``scores`` contiguous ``[B]`` or ``[B, T]`` (then ``mask``: bool, same shape), ``index`` int32/int64
    ``[B]``, ``out`` contiguous fp32 (fp64 for fp64 scores) shaped like ``scores``.
    """
    rows = scores.shape[0]
    device = scores.device
    f64 = torch.float64
    code = ESTIMATORS[estimator]
    if scores.dim() == 2:
        T = scores.shape[1]
        score = torch.empty(rows, dtype=f64, device=device)
        length = torch.empty(rows, dtype=f64, device=device)
        if rows:
            row_scores_kernel[(triton.cdiv(rows, ROWS_BLOCK_B),)](scores, mask, score, length, rows, T,
                                                                  BLOCK_B=ROWS_BLOCK_B, BLOCK_T=ROWS_BLOCK_T)
        adv = torch.empty(rows, dtype=f64, device=device)
    else:
        score = scores.to(f64)
        length = torch.ones_like(score)
        adv = out
    sorted_ids, order = torch.sort(index, stable=True)
    # [count, mean, sum of squared deviations] of batch_moments_kernel, then eps (a fill: no host copy,
    # and float64, where a Python float argument would reach the kernel as float32)
    stats = torch.full((4,), float(eps), dtype=f64, device=device)
    if code == GRPO and SCALES[scale] == BATCH:
        batch_moments_kernel[(1,)](score, score, stats, rows, HAS_WEIGHT=False, IGNORE_NAN=nan == "ignore",
                                   BLOCK=MOMENTS_BLOCK)
    weight = torch.empty(rows, dtype=f64, device=device)
    if rows:
        group_kernel[(rows,)](sorted_ids, order, score, length, stats, adv, weight, rows, ESTIMATOR=code,
                              SCALE=SCALES[scale], SINGLETON=SINGLETONS[singleton], IGNORE_NAN=nan == "ignore",
                              UNBIASED=int(unbiased), BLOCK=GROUP_BLOCK)
    if scores.dim() == 2:
        whiten = code == REINFORCE_PP_BASELINE
        if whiten:
            batch_moments_kernel[(1,)](adv, weight, stats, rows, HAS_WEIGHT=True, IGNORE_NAN=False,
                                       BLOCK=MOMENTS_BLOCK)
        grid = (triton.cdiv(rows, BROADCAST_BLOCK_B), triton.cdiv(scores.shape[1], BROADCAST_BLOCK_T))
        if rows and scores.shape[1]:
            broadcast_kernel[grid](adv, weight, stats, mask, out, rows, scores.shape[1], WHITEN=whiten,
                                   BLOCK_B=BROADCAST_BLOCK_B, BLOCK_T=BROADCAST_BLOCK_T)


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: ``fastrlhf.group_advantages`` as trainers call it
    (grpo with group and batch scale, rloo, opo and reinforce++-baseline on token rewards with a mask, fp32 and
    bf16), so the compiled variants are those these launch."""
    import torch

    import fastrlhf

    def launch(estimator, scale, dtype):
        def run():
            scores = torch.randn(64, 40).to(dtype)
            index = torch.arange(64) // 4
            fastrlhf.group_advantages(scores, index, estimator=estimator, scale=scale,
                                      mask=torch.rand(64, 40) < 0.8)
        return run

    return [(f"group_advantages B=64 T=40 {estimator} scale={scale} {str(dtype).removeprefix('torch.')}",
             launch(estimator, scale, dtype))
            for dtype in (torch.float32, torch.bfloat16)
            for estimator, scale in (("grpo", "group"), ("grpo", "batch"), ("rloo", "group"), ("opo", "group"),
                                     ("reinforce++-baseline", "group"))]
