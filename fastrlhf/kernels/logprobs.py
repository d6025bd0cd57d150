"""Triton kernels of ``fastrlhf.logprobs``: one program per row, online softmax over vocab tiles.

Forward, per row with ``z = x / T`` (fp32; fp64 for fp64 logits), online softmax per lane: each of the
tile's ``BLOCK_V`` lanes keeps its own running max ``m``, ``s = sum exp(z - m)`` and
``u = sum exp(z - m) (z - m)`` over the logits it sees, so the row is read once whatever V is and the only
block-wide reductions are the three at the row's end; ``lse = m + log s``, ``H = log s - u / s``.
Raising a max to ``m'`` rescales both: ``s' = s f``, ``u' = f (u + (m - m') s)`` with ``f = e^(m - m')``.
With fewer rows than MIN_PROGRAMS (a short batch, a small chunk of ``linear_logprobs``) a row's vocabulary
is split over up to ``V / (2 BLOCK_V)`` programs, each reducing its columns to ``(m, s, u)`` the same way,
and a second launch combines the splits in order (no atomics). Floor: the logits read once (``N V`` times
their size) and 12 bytes a row written; the split layout adds ``3 x 4`` bytes per split and row.

Backward, per element with ``d = z - lse`` (= log p): ``dz = p (a + b d)`` plus ``g_logp`` at the label,
``a = -(g_logp + g_ent H)``, ``b = -g_ent``, all times ``1/T``. Each tile is read before it is written,
so the gradient may overwrite the logits (in-place backward).

``EXTRAS`` (TRL's ``ChunkedLogProbFunction`` outputs, no threshold): also ``log sum p^2`` (per lane
``q = sum exp(z - m)^2``, rescaled by ``f^2`` as the max rises), the mean of ``z`` and whether the label is
the first arg-max (the max of the columns before it), into ``extras`` ``[3, rows]``.

``HAS_THRESHOLD``: a per-row threshold (accumulation dtype) restricts the row to a kept set: a logit whose
``z`` is below it counts as ``-inf`` (outside the sums, zero gradient), and so does the label's (log-prob
``-inf``; the caller zeroes that row's upstream gradients, see ``fastrlhf.ops.logprobs_local.logits_grad``). Offsets are int64: rows * V passes 2^31
for 16k tokens x 152k vocab. ``z - m`` is clamped to a finite floor so ``-inf`` logits give
``exp(d) d = 0``, never NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 4096 fp32 per tile over 8 warps: 16 elements per thread, loads of 64 bytes per thread.
BLOCK_V = 4096
NUM_WARPS = 8
# Programs below which a row's vocabulary is split over several (two per SM of a 132-SM H100).
MIN_PROGRAMS = 264
FLOAT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def logprobs_forward_kernel(x_ptr, labels_ptr, inv_temp_ptr, threshold_ptr, logp_ptr, entropy_ptr, lse_ptr,
                            extras_ptr, rows, T, stride_b, stride_t, V, vocab_size, ignore_index, vocab_start,
                            HAS_THRESHOLD: tl.constexpr, EXTRAS: tl.constexpr, BLOCK_V: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if EXTRAS:
            for k in tl.static_range(3):
                tl.store(extras_ptr + k * rows + row, 0.0)
    else:
        inv_t = tl.load(inv_temp_ptr + row)
        threshold = _row_threshold(threshold_ptr, row, HAS_THRESHOLD)
        x_row = x_ptr + _row_offset(row, T, stride_b, stride_t)
        cols = tl.arange(0, BLOCK_V)
        # Per lane (column of the tile) a running max, sum and entropy sum, combined once at the row's end:
        # no block-wide reduction (and its barriers) per tile, and one exp per logit.
        m = tl.full([BLOCK_V], -float("inf"), ACC)
        s = tl.zeros([BLOCK_V], ACC)
        u = tl.zeros([BLOCK_V], ACC)
        q = tl.zeros([BLOCK_V], ACC)  # EXTRAS, per lane: sum exp(z - m)^2, the sum of z, the max before the label
        z_sum = tl.zeros([BLOCK_V], ACC)
        before = tl.full([BLOCK_V], -float("inf"), ACC)
        local = label - vocab_start
        for start in range(0, V, BLOCK_V):
            inside = start + cols < V
            z = _kept(tl.load(x_row + start + cols, mask=inside, other=-float("inf")).to(ACC) * inv_t, threshold,
                      HAS_THRESHOLD)
            m, s, u, up, e = _online_step(m, s, u, z)
            if EXTRAS:
                # The squared terms follow the same max: rescaled by e^2 when z raised it, else adding e^2.
                q = tl.where(up, q * e * e + 1.0, q + e * e)
                z_sum += tl.where(inside, z, 0.0)
                before = tl.maximum(before, tl.where(start + cols < local, z, -float("inf")))
        m, s, u, f = _combine(m, s, u)
        z_label, owned, seen, log_s = _finish_row(x_row, row, label, local, V, vocab_size, inv_t, threshold, m, s, u,
                                                  logp_ptr, entropy_ptr, lse_ptr, HAS_THRESHOLD)
        if EXTRAS:
            # The first arg-max (as torch.argmax): at least the max, and above every column before it.
            top1 = (z_label >= m) & (z_label > tl.max(before, axis=0)) & owned
            log_sq = tl.log(tl.sum(f * f * q, axis=0)) - 2 * log_s
            tl.store(extras_ptr + row, tl.where(seen, log_sq, -float("inf")))
            tl.store(extras_ptr + rows + row, tl.sum(z_sum, axis=0) / V)
            tl.store(extras_ptr + 2 * rows + row, tl.where(top1, 1.0, 0.0))


@triton.jit
def logprobs_backward_kernel(x_ptr, labels_ptr, inv_temp_ptr, threshold_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                             grad_entropy_ptr, out_ptr, T, stride_b, stride_t, out_stride_b, out_stride_t, V,
                             ignore_index, vocab_start,
                             HAS_ENTROPY: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK_V: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    x_row = x_ptr + _row_offset(row, T, stride_b, stride_t)
    out_row = out_ptr + _row_offset(row, T, out_stride_b, out_stride_t)
    cols = tl.arange(0, BLOCK_V)
    if (label == ignore_index) | (lse == -float("inf")):
        for start in range(0, V, BLOCK_V):
            zero = tl.zeros([BLOCK_V], ACC)
            tl.store(out_row + start + cols, zero.to(out_ptr.dtype.element_ty), mask=start + cols < V)
    else:
        inv_t = tl.load(inv_temp_ptr + row)
        threshold = _row_threshold(threshold_ptr, row, HAS_THRESHOLD)
        g_logp = tl.load(grad_logp_ptr + row)
        if HAS_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row)
            a = -inv_t * (g_logp + g_ent * tl.load(entropy_ptr + row))
            b = -inv_t * g_ent
        else:
            a = -inv_t * g_logp
            b = 0.0
        local = label - vocab_start
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            inside = idx < V
            z = _kept(tl.load(x_row + idx, mask=inside, other=0.0).to(ACC) * inv_t, threshold, HAS_THRESHOLD)
            d = tl.maximum(z - lse, -FLOAT_MAX)
            p = tl.exp(d)
            # p * (a + b d) would be 0 * inf at d = -FLOAT_MAX; p d is 0 there.
            grad = p * a + b * (p * d) + tl.where(idx == local, g_logp * inv_t, 0.0)
            tl.store(out_row + idx, grad.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def logprobs_split_kernel(x_ptr, labels_ptr, inv_temp_ptr, threshold_ptr, stats_ptr, rows, splits, span, T, stride_b,
                          stride_t, V, ignore_index, HAS_THRESHOLD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Few rows (``logprobs_forward``'s split layout): program (row, split) reduces the row's columns
    ``[split * span, (split + 1) * span)`` to the split's ``(m, s, u)``, stored at ``stats[k, row, split]``."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    if tl.load(labels_ptr + row) != ignore_index:
        inv_t = tl.load(inv_temp_ptr + row)
        threshold = _row_threshold(threshold_ptr, row, HAS_THRESHOLD)
        x_row = x_ptr + _row_offset(row, T, stride_b, stride_t)
        cols = tl.arange(0, BLOCK_V)
        first = split * span
        stop = tl.minimum(first + span, V)
        m = tl.full([BLOCK_V], -float("inf"), ACC)
        s = tl.zeros([BLOCK_V], ACC)
        u = tl.zeros([BLOCK_V], ACC)
        for start in range(first, stop, BLOCK_V):
            inside = start + cols < stop
            z = _kept(tl.load(x_row + start + cols, mask=inside, other=-float("inf")).to(ACC) * inv_t, threshold,
                      HAS_THRESHOLD)
            m, s, u, _, _ = _online_step(m, s, u, z)
        m, s, u, _ = _combine(m, s, u)
        at = row * splits + split
        tl.store(stats_ptr + at, m)
        tl.store(stats_ptr + rows * splits + at, s)
        tl.store(stats_ptr + 2 * rows * splits + at, u)


@triton.jit
def logprobs_combine_kernel(x_ptr, labels_ptr, inv_temp_ptr, threshold_ptr, stats_ptr, logp_ptr, entropy_ptr,
                            lse_ptr, rows, splits, T, stride_b, stride_t, V, vocab_size, ignore_index, vocab_start,
                            HAS_THRESHOLD: tl.constexpr, BLOCK_S: tl.constexpr):
    """The split layout's second launch: a row's splits combined as lanes are, in split order, then its outputs
    as ``logprobs_forward_kernel`` writes them."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        k = tl.arange(0, BLOCK_S)
        present = k < splits
        at = row * splits + k
        m = tl.load(stats_ptr + at, mask=present, other=-float("inf"))
        s = tl.load(stats_ptr + rows * splits + at, mask=present, other=0.0)
        u = tl.load(stats_ptr + 2 * rows * splits + at, mask=present, other=0.0)
        m, s, u, _ = _combine(m, s, u)
        _finish_row(x_ptr + _row_offset(row, T, stride_b, stride_t), row, label, label - vocab_start, V, vocab_size,
                    tl.load(inv_temp_ptr + row), _row_threshold(threshold_ptr, row, HAS_THRESHOLD), m, s, u,
                    logp_ptr, entropy_ptr, lse_ptr, HAS_THRESHOLD)


@triton.jit
def _combine(lane_m, s, u):
    """Lanes' (or splits') running ``(m, s, u)`` against the row's max, in lane order; also each lane's factor
    ``f = e^(m_lane - m)``. NaN in a lane's s or u carries through; +inf logits make inf - inf here, NaN, as
    in the sums of one max."""
    m = tl.max(lane_m, axis=0)
    shift = tl.maximum(lane_m - tl.where(m == -float("inf"), 0.0, m), -FLOAT_MAX, propagate_nan=tl.PropagateNan.ALL)
    f = tl.exp(shift)
    return m, tl.sum(f * s, axis=0), tl.sum(f * (u + shift * s), axis=0), f


@triton.jit
def _finish_row(x_row, row, label, local, V, vocab_size, inv_t, threshold, m, s, u, logp_ptr, entropy_ptr, lse_ptr,
                HAS_THRESHOLD: tl.constexpr):
    """A row's log-prob, entropy and logsumexp from its combined ``(m, s, u)``, stored; returns the label's
    z, whether this shard owns the label, whether the row has a distribution, and ``log s``."""
    owned = (local >= 0) & (local < V)
    z_label = _kept(tl.load(x_row + local, mask=owned, other=0.0).to(m.dtype) * inv_t, threshold, HAS_THRESHOLD)
    # Every logit -inf: no distribution, so log-probs -inf and entropy 0. A NaN logit: all NaN.
    seen = (m > -float("inf")) | (s != s)
    log_s = tl.log(s)
    lse = tl.where(seen, m + log_s, -float("inf"))
    entropy = tl.where(seen, log_s - u / s, 0.0)
    # A label logit of -inf (or outside the kept set) has log-prob -inf, also when the whole row is -inf
    # (not -inf - -inf).
    logp = tl.where((z_label == -float("inf")) & (lse == lse), -float("inf"), z_label - lse)
    # An out-of-range label (unchecked under torch.compile and on CUDA by default) poisons its row; a NaN
    # lse makes the backward's gradient row NaN too.
    valid = (label >= 0) & (label < vocab_size)
    tl.store(logp_ptr + row, tl.where(valid, tl.where(owned, logp, 0.0), float("nan")))
    tl.store(entropy_ptr + row, tl.where(valid, entropy, float("nan")))
    tl.store(lse_ptr + row, tl.where(valid, lse, float("nan")))
    return z_label, owned, seen, log_s


@triton.jit
def _online_step(m, s, u, z):
    """Adds logit ``z`` to a lane's running max ``m``, ``s = sum exp(z - m)`` and ``u = sum exp(z - m) (z - m)``
    with one exp: a new max rescales by ``e^(m - z)`` and adds ``e^0 = 1``; otherwise ``e^(z - m)`` adds. The
    exponent is clamped to a finite floor (``-inf`` logits add 0, never 0 * inf), a NaN ``z`` never becomes
    the max (``z > m`` is false) and reaches ``s`` and ``u`` through its own exp. Also returns whether ``z``
    raised the max and the exp taken, for sums that follow the same max (the extras' ``sum exp(z - m)^2``)."""
    up = z > m
    base = tl.where(m == -float("inf"), 0.0, m)  # no -inf - -inf while the lane holds only -inf
    d = tl.where(up, tl.maximum(m - z, -FLOAT_MAX),
                 tl.maximum(z - base, -FLOAT_MAX, propagate_nan=tl.PropagateNan.ALL))
    e = tl.exp(d)
    return tl.where(up, z, m), tl.where(up, s * e + 1.0, s + e), tl.where(up, e * (u + d * s), u + e * d), up, e


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    """Where row ``row`` of ``[B, T, V]`` logits starts (``[N, V]``: ``T = N``, ``stride_b = 0``)."""
    return (row // T) * stride_b + (row % T) * stride_t


@triton.jit
def _row_threshold(threshold_ptr, row, HAS_THRESHOLD: tl.constexpr):
    if HAS_THRESHOLD:
        return tl.load(threshold_ptr + row)
    return -float("inf")


@triton.jit
def _kept(z, threshold, HAS_THRESHOLD: tl.constexpr):
    """``z``, or ``-inf`` where it lies below the row's threshold (NaN stays NaN)."""
    if HAS_THRESHOLD:
        z = tl.where(z < threshold, -float("inf"), z)
    return z


def logprobs_forward(logits, labels, inv_temp, threshold, ignore_index, vocab_start, vocab_size, logp, entropy,
                     lse, extras=None):
    """Launches the forward; arguments as the C++ op ``fastrlhf_cpp::logprobs_forward`` (checked in Python).

    A program per row; with fewer rows than MIN_PROGRAMS (a short batch, a small chunk of
    ``linear_logprobs``), each row's vocabulary is split over ``splits`` programs (``split_layout``) whose
    ``(m, s, u)`` a second launch combines in split order: deterministic, no atomics, and the logits are
    still read once."""
    rows, V = labels.shape[0], logits.shape[-1]
    if rows == 0:
        return
    layout = _layout(logits)
    thresholds = inv_temp if threshold is None else threshold
    splits, span = split_layout(rows, V) if extras is None else (1, V)
    if splits == 1:
        logprobs_forward_kernel[(rows,)](logits, labels, inv_temp, thresholds, logp, entropy, lse,
                                         lse if extras is None else extras, rows, *layout, V, vocab_size,
                                         ignore_index, vocab_start, HAS_THRESHOLD=threshold is not None,
                                         EXTRAS=extras is not None, BLOCK_V=_block(V), num_warps=NUM_WARPS)
        return
    stats = lse.new_empty((3, rows, splits))
    logprobs_split_kernel[(rows, splits)](logits, labels, inv_temp, thresholds, stats, rows, splits, span, *layout,
                                          V, ignore_index, HAS_THRESHOLD=threshold is not None, BLOCK_V=_block(V),
                                          num_warps=NUM_WARPS)
    logprobs_combine_kernel[(rows,)](logits, labels, inv_temp, thresholds, stats, logp, entropy, lse, rows, splits,
                                     *layout, V, vocab_size, ignore_index, vocab_start,
                                     HAS_THRESHOLD=threshold is not None, BLOCK_S=triton.next_power_of_2(splits))


def split_layout(rows: int, V: int) -> tuple[int, int]:
    """``(splits, span)``: programs per row and the columns each takes (a multiple of BLOCK_V, at least two
    tiles), enough for MIN_PROGRAMS programs in all when the rows alone are fewer; ``(1, V)`` otherwise."""
    if rows >= MIN_PROGRAMS or V <= 2 * BLOCK_V:
        return 1, V
    wanted = min(triton.cdiv(V, 2 * BLOCK_V), triton.cdiv(MIN_PROGRAMS, rows))
    span = triton.cdiv(triton.cdiv(V, wanted), BLOCK_V) * BLOCK_V
    return triton.cdiv(V, span), span


def logprobs_backward(logits, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index,
                      vocab_start, vocab_size, grad_logits):
    """Launches the backward into ``grad_logits`` (which may be ``logits``); ``entropy``/``grad_entropy``
    are both None when the entropy got no gradient."""
    rows, V = labels.shape[0], logits.shape[-1]
    if rows == 0:
        return
    has_entropy = grad_entropy is not None
    logprobs_backward_kernel[(rows,)](
        logits, labels, inv_temp, inv_temp if threshold is None else threshold, lse, entropy if has_entropy else lse,
        grad_logp, grad_entropy if has_entropy else grad_logp, grad_logits, *_layout(logits),
        *_layout(grad_logits)[1:], V, ignore_index, vocab_start, HAS_ENTROPY=has_entropy, HAS_THRESHOLD=threshold is not None,
        BLOCK_V=_block(V), num_warps=NUM_WARPS)


def _layout(logits):
    """``(T, stride_b, stride_t)`` of ``[N, V]`` or ``[B, T, V]`` logits (unit vocab stride)."""
    if logits.dim() == 2:
        return max(logits.shape[0], 1), 0, logits.stride(0)
    return max(logits.shape[1], 1), logits.stride(0), logits.stride(1)


def _block(V: int) -> int:
    return min(BLOCK_V, max(16, triton.next_power_of_2(V)))


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: forward and backward of ``fastrlhf.logprobs`` on
    shifted ``logits[:, :-1]`` as trainers pass them (fp32 and bf16; a vocabulary divisible by 16 and an odd
    one; with and without the entropy) and of ``fastrlhf.linear_logprobs`` (vocab slices; with TRL's
    extras), so the compiled variants are those these launch."""
    import torch

    import fastrlhf

    def shifted(vocab, dtype, entropy):
        def run():
            logits = torch.randn(2, 5, vocab).to(dtype).requires_grad_()
            labels = torch.randint(0, vocab, (2, 4))
            out = fastrlhf.logprobs(logits[:, :-1], labels, temperature=0.7, return_entropy=entropy)
            torch.autograd.grad([o.sum() for o in (out if entropy else (out,))], logits)
        return run

    def linear(dtype, extras=False):
        def run():
            hidden, weight = torch.randn(32, 64).to(dtype).requires_grad_(), torch.randn(32000, 64).to(dtype)
            logp, entropy, *_ = fastrlhf.linear_logprobs(hidden, weight.requires_grad_(),
                                                         torch.randint(0, 32000, (32,)), return_entropy=True,
                                                         return_extras=extras)
            torch.autograd.grad((logp.sum(), entropy.sum()), (hidden, weight))
        return run

    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        cases += [(f"logprobs [2, 5, {vocab}][:, :-1] {name}{' entropy' if entropy else ''}",
                   shifted(vocab, dtype, entropy)) for vocab, entropy in ((151936, True), (50257, False))]
        cases.append((f"linear_logprobs N=32 H=64 V=32000 {name}", linear(dtype)))
        cases.append((f"linear_logprobs N=32 H=64 V=32000 {name} extras (TRL)", linear(dtype, extras=True)))
    return cases
