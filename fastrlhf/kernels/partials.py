"""What the Triton kernels that reduce in two steps share (``policy_loss``, ``rollout_correction``): programs
write rows of partial sums (no atomics), and one program combines the rows in a fixed order."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nan_min(x, axis: tl.constexpr):
    """``tl.min`` that propagates NaN (``tl.min`` drops it)."""
    return tl.where(tl.sum(tl.where(x != x, 1, 0), axis) > 0, float("nan"), tl.min(x, axis))


@triton.jit
def nan_max(x, axis: tl.constexpr):
    """``tl.max`` that propagates NaN (``tl.max`` drops it)."""
    return tl.where(tl.sum(tl.where(x != x, 1, 0), axis) > 0, float("nan"), tl.max(x, axis))


@triton.jit
def combine_partials(partials_ptr, num_rows, NUM_PARTIALS: tl.constexpr, MIN_COL: tl.constexpr,
                     MAX_COL: tl.constexpr, NAN_EXTREMES: tl.constexpr, BLOCK_K: tl.constexpr, PAD: tl.constexpr):
    """The column totals ``[PAD]`` (fp64) of ``[num_rows, NUM_PARTIALS]`` partial sums, rows combined in a fixed
    order: sums, except the minimum of column ``MIN_COL`` and the maximum of ``MAX_COL`` (NaN propagates with
    ``NAN_EXTREMES``, else it is ignored)."""
    col = tl.arange(0, PAD)
    is_min = col == MIN_COL
    is_max = col == MAX_COL
    init = tl.where(is_min, float("inf"), tl.where(is_max, -float("inf"), 0.0)).to(tl.float64)
    acc = tl.zeros([BLOCK_K, PAD], tl.float64) + init[None, :]
    for start in range(0, num_rows, BLOCK_K):
        row = start + tl.arange(0, BLOCK_K)
        ok = (row[:, None] < num_rows) & (col[None, :] < NUM_PARTIALS)
        p = tl.load(partials_ptr + row[:, None].to(tl.int64) * NUM_PARTIALS + col[None, :], mask=ok, other=0.0)
        p = tl.where(ok, p.to(tl.float64), init[None, :])
        if NAN_EXTREMES:
            low = tl.where((p != p) | (p < acc), p, acc)
            high = tl.where((p != p) | (p > acc), p, acc)
        else:
            low = tl.minimum(acc, p)
            high = tl.maximum(acc, p)
        acc = tl.where(is_min[None, :], low, tl.where(is_max[None, :], high, acc + p))
    sums = tl.sum(tl.where(is_min[None, :] | is_max[None, :], 0.0, acc), 0)
    if NAN_EXTREMES:
        lowest = nan_min(acc, 0)
        highest = nan_max(acc, 0)
    else:
        lowest = tl.min(acc, 0)
        highest = tl.max(acc, 0)
    return tl.where(is_min, lowest, tl.where(is_max, highest, sums))
