"""Triton kernels of ``fastrlhf.logprobs``: one program per row, online softmax over vocab tiles.

Forward, per row with ``z = x / T`` (fp32; fp64 for fp64 logits) and a running max ``m``: each tile's
max first, then its exponentials against the raised max, so the row is read once whatever V is:
``s = sum exp(z - m)``, ``u = sum exp(z - m) (z - m)``, ``lse = m + log s``, ``H = log s - u / s``.
Raising the max to ``m'`` rescales both: ``s' = s f``, ``u' = f (u + (m - m') s)`` with ``f = e^(m - m')``.

Backward, per element with ``d = z - lse`` (= log p): ``dz = p (a + b d)`` plus ``g_logp`` at the label,
``a = -(g_logp + g_ent H)``, ``b = -g_ent``, all times ``1/T``. Each tile is read before it is written,
so the gradient may overwrite the logits (in-place backward).

``HAS_THRESHOLD``: a per-row threshold (accumulation dtype) restricts the row to a kept set: a logit whose
``z`` is below it counts as ``-inf`` (outside the sums, zero gradient), and so does the label's (log-prob
``-inf``; the caller zeroes that row's upstream gradients, see ``fastrlhf.ops.logprobs.logits_grad``). Offsets are int64: rows * V passes 2^31
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
                            stride_row, V, ignore_index, vocab_start, HAS_THRESHOLD: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        inv_t = tl.load(inv_temp_ptr + row)
        threshold = _row_threshold(threshold_ptr, row, HAS_THRESHOLD)
        x_row = x_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([], -float("inf"), ACC)
        s = tl.zeros([], ACC)
        u = tl.zeros([], ACC)
        for start in range(0, V, BLOCK_V):
            inside = start + cols < V
            z = _kept(tl.load(x_row + start + cols, mask=inside, other=-float("inf")).to(ACC) * inv_t, threshold,
                      HAS_THRESHOLD)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # Until a finite logit is seen, m_new is -inf and nothing is added (no -inf - -inf).
            if m_new > -float("inf"):
                shift = tl.maximum(m - m_new, -FLOAT_MAX)
                f = tl.exp(shift)
                u = f * (u + shift * s)
                s = f * s
                d = tl.maximum(z - m_new, -FLOAT_MAX)
                e = tl.exp(d)
                s += tl.sum(e, axis=0)
                u += tl.sum(e * d, axis=0)
                m = m_new
        local = label - vocab_start
        owned = (local >= 0) & (local < V)
        z_label = _kept(tl.load(x_row + local, mask=owned, other=0.0).to(ACC) * inv_t, threshold, HAS_THRESHOLD)
        # Every logit -inf: no distribution, so log-probs -inf and entropy 0.
        seen = m > -float("inf")
        log_s = tl.log(s)
        lse = tl.where(seen, m + log_s, -float("inf"))
        entropy = tl.where(seen, log_s - u / s, 0.0)
        # A label logit of -inf (or outside the kept set) has log-prob -inf, also when the whole row is -inf (not -inf - -inf).
        logp = tl.where(z_label == -float("inf"), -float("inf"), z_label - lse)
        tl.store(logp_ptr + row, tl.where(owned, logp, 0.0))
        tl.store(entropy_ptr + row, entropy)
        tl.store(lse_ptr + row, lse)


@triton.jit
def logprobs_backward_kernel(x_ptr, labels_ptr, inv_temp_ptr, threshold_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                             grad_entropy_ptr, out_ptr, stride_row, stride_out, V, ignore_index, vocab_start,
                             HAS_ENTROPY: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK_V: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    x_row = x_ptr + row * stride_row
    out_row = out_ptr + row * stride_out
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
                     lse):
    """Launches the forward; arguments as the C++ op ``fastrlhf_cpp::logprobs_forward`` (checked in Python)."""
    rows, V = logits.shape
    if rows == 0:
        return
    logprobs_forward_kernel[(rows,)](logits, labels, inv_temp, inv_temp if threshold is None else threshold, logp,
                                     entropy, lse, logits.stride(0), V, ignore_index, vocab_start,
                                     HAS_THRESHOLD=threshold is not None, BLOCK_V=_block(V), num_warps=NUM_WARPS)


def logprobs_backward(logits, labels, inv_temp, threshold, lse, entropy, grad_logp, grad_entropy, ignore_index,
                      vocab_start, vocab_size, grad_logits):
    """Launches the backward into ``grad_logits`` (which may be ``logits``); ``entropy``/``grad_entropy``
    are both None when the entropy got no gradient."""
    rows, V = logits.shape
    if rows == 0:
        return
    has_entropy = grad_entropy is not None
    logprobs_backward_kernel[(rows,)](
        logits, labels, inv_temp, inv_temp if threshold is None else threshold, lse, entropy if has_entropy else lse,
        grad_logp, grad_entropy if has_entropy else grad_logp, grad_logits, logits.stride(0), grad_logits.stride(0),
        V, ignore_index, vocab_start, HAS_ENTROPY=has_entropy, HAS_THRESHOLD=threshold is not None,
        BLOCK_V=_block(V), num_warps=NUM_WARPS)


def _block(V: int) -> int:
    return min(BLOCK_V, max(16, triton.next_power_of_2(V)))


def aot_cases():
    """(name, kernel, signature, constexprs) for ahead-of-time compilation, fp32 and bf16 logits."""
    cases = []
    for dtype in ("fp32", "bf16"):
        rows = {"labels_ptr": "*i64", "inv_temp_ptr": "*fp32", "threshold_ptr": "*fp32", "stride_row": "i64", "V": "i64",
                "ignore_index": "i64", "vocab_start": "i64"}
        forward = {"x_ptr": f"*{dtype}", "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", **rows}
        backward = {"x_ptr": f"*{dtype}", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
                    "grad_entropy_ptr": "*fp32", "out_ptr": f"*{dtype}", "stride_out": "i64", **rows}
        cases.append((f"logprobs_forward {dtype} BLOCK_V={BLOCK_V}", logprobs_forward_kernel, forward,
                      {"HAS_THRESHOLD": False, "BLOCK_V": BLOCK_V}))
        cases.append((f"logprobs_backward {dtype} BLOCK_V={BLOCK_V}", logprobs_backward_kernel, backward,
                      {"HAS_ENTROPY": True, "HAS_THRESHOLD": False, "BLOCK_V": BLOCK_V}))
    return cases
