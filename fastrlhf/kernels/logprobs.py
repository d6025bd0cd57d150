"""Triton kernels of ``fastrlhf.logprobs``: one program per row, online softmax over vocab tiles.

Forward, per row with ``z = x / T`` (fp32; fp64 for fp64 logits), online softmax per lane: each of the
tile's ``BLOCK_V`` lanes keeps its own running max ``m``, ``s = sum exp(z - m)`` and
``u = sum exp(z - m) (z - m)`` over the logits it sees, so the row is read once whatever V is and the only
block-wide reductions are the three at the row's end; ``lse = m + log s``, ``H = log s - u / s``.
Raising a max to ``m'`` rescales both: ``s' = s f``, ``u' = f (u + (m - m') s)`` with ``f = e^(m - m')``.

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
            if EXTRAS:
                # The squared terms follow the same max: rescaled by e^(2 (m - z)) when z raises it.
                up = z > m
                e2 = tl.exp(2 * tl.where(up, tl.maximum(m - z, -FLOAT_MAX),
                                         tl.maximum(z - tl.where(m == -float("inf"), 0.0, m), -FLOAT_MAX)))
                q = tl.where(up, q * e2 + 1.0, q + e2)
                z_sum += tl.where(inside, z, 0.0)
                before = tl.maximum(before, tl.where(start + cols < local, z, -float("inf")))
            m, s, u = _online_step(m, s, u, z)
        # The lanes' sums against the row's max (NaN in a lane's s or u carries through; +inf logits
        # make inf - inf here, NaN, as in the sums of one max).
        lane_m = m
        m = tl.max(lane_m, axis=0)
        shift = tl.maximum(lane_m - tl.where(m == -float("inf"), 0.0, m), -FLOAT_MAX,
                           propagate_nan=tl.PropagateNan.ALL)
        f = tl.exp(shift)
        u = tl.sum(f * (u + shift * s), axis=0)
        s = tl.sum(f * s, axis=0)
        owned = (local >= 0) & (local < V)
        z_label = _kept(tl.load(x_row + local, mask=owned, other=0.0).to(ACC) * inv_t, threshold, HAS_THRESHOLD)
        # Every logit -inf: no distribution, so log-probs -inf and entropy 0. A NaN logit: all NaN.
        seen = (m > -float("inf")) | (s != s)
        log_s = tl.log(s)
        lse = tl.where(seen, m + log_s, -float("inf"))
        entropy = tl.where(seen, log_s - u / s, 0.0)
        # A label logit of -inf (or outside the kept set) has log-prob -inf, also when the whole row is -inf
        # (not -inf - -inf).
        logp = tl.where((z_label == -float("inf")) & (lse == lse), -float("inf"), z_label - lse)
        # An out-of-range label (unchecked under torch.compile and on CUDA by default) poisons its row; a
        # NaN lse makes the backward's gradient row NaN too.
        valid = (label >= 0) & (label < vocab_size)
        tl.store(logp_ptr + row, tl.where(valid, tl.where(owned, logp, 0.0), float("nan")))
        tl.store(entropy_ptr + row, tl.where(valid, entropy, float("nan")))
        tl.store(lse_ptr + row, tl.where(valid, lse, float("nan")))
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
def _online_step(m, s, u, z):
    """Adds logit ``z`` to a lane's running max ``m``, ``s = sum exp(z - m)`` and ``u = sum exp(z - m) (z - m)``
    with one exp: a new max rescales by ``e^(m - z)`` and adds ``e^0 = 1``; otherwise ``e^(z - m)`` adds. The
    exponent is clamped to a finite floor (``-inf`` logits add 0, never 0 * inf), a NaN ``z`` never becomes
    the max (``z > m`` is false) and reaches ``s`` and ``u`` through its own exp."""
    up = z > m
    base = tl.where(m == -float("inf"), 0.0, m)  # no -inf - -inf while the lane holds only -inf
    d = tl.where(up, tl.maximum(m - z, -FLOAT_MAX),
                 tl.maximum(z - base, -FLOAT_MAX, propagate_nan=tl.PropagateNan.ALL))
    e = tl.exp(d)
    return tl.where(up, z, m), tl.where(up, s * e + 1.0, s + e), tl.where(up, e * (u + d * s), u + e * d)


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
    """Launches the forward; arguments as the C++ op ``fastrlhf_cpp::logprobs_forward`` (checked in Python)."""
    rows, V = labels.shape[0], logits.shape[-1]
    if rows == 0:
        return
    logprobs_forward_kernel[(rows,)](logits, labels, inv_temp, inv_temp if threshold is None else threshold, logp,
                                     entropy, lse, lse if extras is None else extras, rows, *_layout(logits), V,
                                     vocab_size, ignore_index, vocab_start, HAS_THRESHOLD=threshold is not None,
                                     EXTRAS=extras is not None, BLOCK_V=_block(V), num_warps=NUM_WARPS)


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
