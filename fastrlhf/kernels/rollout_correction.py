"""Triton kernels of ``fastrlhf.rollout_correction`` (``fastrlhf/ops/rollout_correction.py``; the C++ kernels in
``csrc/rollout_correction.cpp`` compute the same).

- ``sequences_kernel``: one program per sequence (B=512 sequences: 512 programs on 132 SMs; at 80-106
  registers per thread and 128 threads, 4 programs fit on an SM at once, so all 512 run in one wave). Each
  loops over its sequence in tiles of ``BLOCK_TOKENS``; a few long packed sequences fill fewer SMs.
  With ``SEQUENCE_PASS`` (sequence-level IS weights or a ``seq_*`` rejection option) it first sums the
  sequence's log-ratio and k1/k2/k3 statistics over its tiles, then, in a second loop over the same tiles
  (still in L2), writes each token's weight (fp32) and kept flag (bool) and the sequence's
  ``len(PARTIALS)`` partial sums of the metrics (fp64, no atomics). Bytes-moved floor per token, fp32 inputs:
  read old_logp, rollout_logp and the mask (9 B), write the weight and the kept flag (5 B): 14 B; the
  second loop re-reads 9 B from L2, not HBM.
- ``finish_kernel``: one program combines the ``[S, len(PARTIALS)]`` partial sums in a fixed order (fp64)
  into the ``len(METRICS)`` fp32 metrics.

Offsets are int64; a program whose offsets are out of order or outside ``[0, N]`` (unchecked cu_seqlens on
CUDA) reads nothing and writes NaN partial sums, so the metrics come out NaN. Scalar thresholds arrive as
fp32 arguments (fp64 kernels upcast them). Per-token arithmetic is fp32 (fp64 for fp64); sums are fp64: a
sequence-level weight is exp of a sum of thousands of terms. Minima and maxima propagate NaN on purpose (``tl.min`` and
``tl.max`` drop it): a NaN at an unmasked token shows in the metrics, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.kernels.partials import combine_partials, nan_max, nan_min

# Codes shared with fastrlhf/ops/rollout_correction.py (IS_LEVELS, PARTIALS).
IS_NONE, IS_TOKEN, IS_SEQUENCE = (tl.constexpr(code) for code in range(3))
NUM_PARTIALS = tl.constexpr(7)
PARTIALS_PAD = 8
BLOCK_TOKENS = 512
NUM_WARPS = 4


@triton.jit
def _clamp(x, lo, hi):
    """NaN stays NaN (as torch.clamp): a NaN log-ratio at an unmasked token gives a NaN weight."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _passes(k1, k2, k3, k1_lo, k1_hi, k2_hi, k3_hi, FLAGS: tl.constexpr):
    """Whether the statistics pass the k1 / k2 / k3 options of one level (bits 1, 2, 4 of FLAGS); NaN fails."""
    ok = tl.full(k1.shape, 1, tl.int1)
    if FLAGS & 1:
        ok = ok & (k1 >= k1_lo) & (k1 <= k1_hi)
    if FLAGS & 2:
        ok = ok & (k2 <= k2_hi)
    if FLAGS & 4:
        ok = ok & (k3 <= k3_hi)
    return ok


@triton.jit
def sequences_kernel(old_ptr, rollout_ptr, mask_ptr, offsets_ptr, weights_ptr, kept_ptr, partials_ptr, n,
                     is_lo, is_hi, tok_k1_lo, tok_k1_hi, tok_k2_hi, tok_k3_hi, sum_k1_lo, sum_k1_hi, sum_k2_hi,
                     sum_k3_hi, mean_k1_lo, mean_k1_hi, mean_k2_hi, mean_k3_hi, max_k1_lo, max_k1_hi, max_k2_hi,
                     max_k3_hi, IS_LEVEL: tl.constexpr, IS_WINDOW: tl.constexpr, RS_FLAGS: tl.constexpr,
                     SEQUENCE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if old_ptr.dtype.element_ty == tl.float64 else tl.float32
    s = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    valid = (start >= 0) & (start <= end) & (end <= n)
    valid = valid & ((s != 0) | (start == 0)) & ((s != tl.num_programs(0) - 1) | (end == n))
    end = tl.where(valid, end, start)  # an invalid range reads nothing
    lanes = tl.arange(0, BLOCK)
    seq_ok = tl.full([], 1, tl.int1)
    seq_weight = tl.full([], 1.0, ACC)
    if SEQUENCE_PASS:
        count = tl.zeros([BLOCK], tl.float64)
        log_ratio = tl.zeros([BLOCK], tl.float64)
        k1 = tl.zeros([BLOCK], tl.float64)
        k2 = tl.zeros([BLOCK], tl.float64)
        k3 = tl.zeros([BLOCK], tl.float64)
        max_k2 = tl.full([BLOCK], -float("inf"), ACC)
        max_k3 = tl.full([BLOCK], -float("inf"), ACC)
        for tile in range(start, end, BLOCK):
            i = tile + lanes
            keep = (i < end) & (tl.load(mask_ptr + i, mask=i < end, other=0) != 0)
            # Masked loads: a masked token is never read, so NaN or inf there changes nothing.
            d = tl.load(old_ptr + i, mask=keep, other=0.0).to(ACC) - tl.load(rollout_ptr + i, mask=keep,
                                                                              other=0.0).to(ACC)
            safe = _clamp(d, -20.0, 20.0)
            t2 = 0.5 * safe * safe
            t3 = tl.exp(safe) - 1.0 - safe
            count += tl.where(keep, 1.0, 0.0)
            log_ratio += d
            k1 -= safe
            k2 += t2
            k3 += t3
            # NaN-propagating maxima: a NaN statistic rejects the sequence, as in the reference.
            max_k2 = tl.where(keep & ((t2 > max_k2) | (t2 != t2)), t2, max_k2)
            max_k3 = tl.where(keep & ((t3 > max_k3) | (t3 != t3)), t3, max_k3)
        c = tl.sum(count, 0)
        norm = 1.0 / tl.maximum(c, 1.0)
        s1 = tl.sum(k1, 0)
        s2 = tl.sum(k2, 0)
        s3 = tl.sum(k3, 0)
        m2 = tl.where(c > 0, nan_max(max_k2, 0), 0.0)
        m3 = tl.where(c > 0, nan_max(max_k3, 0), 0.0)
        seq_ok = (_passes(s1, s2, s3, sum_k1_lo, sum_k1_hi, sum_k2_hi, sum_k3_hi, (RS_FLAGS >> 3) & 7)
                  & _passes(s1 * norm, s2 * norm, s3 * norm, mean_k1_lo, mean_k1_hi, mean_k2_hi, mean_k3_hi,
                            (RS_FLAGS >> 6) & 7)
                  & _passes(m2, m2, m3, max_k1_lo, max_k1_hi, max_k2_hi, max_k3_hi, (RS_FLAGS >> 9) & 7))
        seq_weight = tl.exp(_clamp(tl.sum(log_ratio, 0), -20.0, 20.0).to(ACC))
    tokens = tl.zeros([BLOCK], tl.float64)
    weight_sum = tl.zeros([BLOCK], tl.float64)
    weight_min = tl.full([BLOCK], float("inf"), ACC)
    weight_max = tl.full([BLOCK], -float("inf"), ACC)
    clipped_sum = tl.zeros([BLOCK], tl.float64)
    rejected = tl.zeros([BLOCK], tl.float64)
    for tile in range(start, end, BLOCK):
        i = tile + lanes
        inside = i < end
        keep = inside & (tl.load(mask_ptr + i, mask=inside, other=0) != 0)
        d = tl.load(old_ptr + i, mask=keep, other=0.0).to(ACC) - tl.load(rollout_ptr + i, mask=keep,
                                                                          other=0.0).to(ACC)
        safe = _clamp(d, -20.0, 20.0)
        e = tl.exp(safe)
        if IS_LEVEL == IS_TOKEN:
            w = e
        elif IS_LEVEL == IS_SEQUENCE:
            w = tl.zeros([BLOCK], ACC) + seq_weight
        else:
            w = tl.full([BLOCK], 1.0, ACC)
        # Selected, not tl.minimum: a NaN weight stays NaN.
        if IS_LEVEL == IS_NONE:
            clipped = tl.zeros([BLOCK], tl.int1)
            corrected = w
        elif IS_WINDOW:
            clipped = (w < is_lo) | (w > is_hi)
            corrected = tl.where(clipped, 0.0, w)
        else:
            clipped = w > is_hi
            corrected = tl.where(clipped, is_hi, w)
        ok = seq_ok & _passes(-safe, 0.5 * safe * safe, e - 1.0 - safe, tok_k1_lo, tok_k1_hi, tok_k2_hi, tok_k3_hi,
                              RS_FLAGS & 7)
        final = keep & ok
        tl.store(weights_ptr + i, tl.where(final, corrected, 0.0).to(tl.float32), mask=inside)
        tl.store(kept_ptr + i, final.to(tl.int1), mask=inside)
        tokens += tl.where(keep, 1.0, 0.0)
        weight_sum += tl.where(keep, w, 0.0)
        weight_min = tl.where(keep & ((w < weight_min) | (w != w)), w, weight_min)
        weight_max = tl.where(keep & ((w > weight_max) | (w != w)), w, weight_max)
        clipped_sum += tl.where(keep & clipped, 1.0, 0.0)
        rejected += tl.where(keep & ~ok, 1.0, 0.0)
    poison = tl.where(valid, 0.0, float("nan"))
    base = partials_ptr + s * NUM_PARTIALS
    r = tl.sum(rejected, 0)
    tl.store(base + 0, tl.sum(tokens, 0) + poison)
    tl.store(base + 1, tl.sum(weight_sum, 0) + poison)
    tl.store(base + 2, nan_min(weight_min, 0) + poison)
    tl.store(base + 3, nan_max(weight_max, 0) + poison)
    tl.store(base + 4, tl.sum(clipped_sum, 0) + poison)
    tl.store(base + 5, r + poison)
    tl.store(base + 6, tl.where(r > 0, 1.0, 0.0) + poison)


@triton.jit
def finish_kernel(partials_ptr, metrics_ptr, num_rows, BLOCK_K: tl.constexpr, PAD: tl.constexpr):
    col = tl.arange(0, PAD)
    is_min = col == 2
    is_max = col == 3
    total = combine_partials(partials_ptr, num_rows, NUM_PARTIALS, 2, 3, True, BLOCK_K, PAD)
    tokens = tl.sum(tl.where(col == 0, total, 0.0), 0)
    norm = 1.0 / tl.maximum(tokens, 1.0)
    # METRICS: mean weight, min, max (0 without tokens), clipped and rejected token shares, rejected
    # sequences over all sequences; metric k is partial k + 1.
    metric = tl.where(col == 1, total * norm, tl.where(is_min | is_max, tl.where(tokens == 0, 0.0, total),
                                                          tl.where(col == 6, total / num_rows, total * norm)))
    tl.store(metrics_ptr + col - 1, metric.to(tl.float32), mask=(col >= 1) & (col < NUM_PARTIALS))


def rollout_correction(old_logp, rollout_logp, mask, offsets, is_level, is_window, is_lo, is_hi, rs_flags, rs_bounds,
                       weights, kept, metrics):
    """Launches both kernels; arguments as ``torch.ops.fastrlhf_cpp.rollout_correction``."""
    rows = offsets.numel() - 1
    partials = metrics.new_empty((rows, NUM_PARTIALS.value), dtype=torch.float64)
    sequences_kernel[(rows,)](
        old_logp, rollout_logp, mask, offsets, weights, kept, partials, old_logp.numel(), is_lo, is_hi, *rs_bounds,
        IS_LEVEL=is_level, IS_WINDOW=is_window, RS_FLAGS=rs_flags,
        SEQUENCE_PASS=is_level == IS_SEQUENCE.value or (rs_flags >> 3) != 0, BLOCK=BLOCK_TOKENS,
        num_warps=NUM_WARPS)
    finish_kernel[(1,)](partials, metrics, rows, BLOCK_K=64, PAD=PARTIALS_PAD, num_warps=4)


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: ``fastrlhf.rollout_correction`` as trainers call
    it (sequence-level TIS with a rejection chain: two passes; token-level IcePop with a token option: one
    pass; packed input), fp32 and bf16, so the compiled variants are those these launch."""
    import fastrlhf

    def launch(dtype, options, packed):
        def run():
            shape = (96,) if packed else (4, 24)
            rollout = -torch.rand(shape).to(dtype)
            old = (rollout + 0.1 * torch.randn(shape)).to(dtype)
            extra = {"cu_seqlens": torch.tensor([0, 30, 70, 96])} if packed else {}
            fastrlhf.rollout_correction(old, rollout, torch.rand(shape) < 0.9, **options, **extra)
        return run

    two_pass = dict(is_level="sequence", is_threshold=2.0, rs="token_k1,seq_mean_k3,seq_max_k2",
                    rs_threshold="0.5_2.0,0.01,0.1")
    one_pass = dict(is_level="token", is_threshold=(0.5, 2.0), rs="token_k2", rs_threshold=0.1)
    return [(f"rollout_correction {label}{' packed' if packed else ''} {str(dtype).removeprefix('torch.')}",
             launch(dtype, options, packed))
            for dtype in (torch.float32, torch.bfloat16)
            for label, options, packed in (("sequence TIS + rs chain", two_pass, False),
                                           ("token IcePop + token_k2", one_pass, False),
                                           ("sequence TIS + rs chain", two_pass, True))]
