"""Triton kernels of ``fastrlhf.policy_loss`` (``fastrlhf/ops/policy_loss.py``; the C++ kernels in
``csrc/policy_loss.cpp`` compute the same).

- ``sequences_kernel``: one program per sequence: its unmasked tokens and (gspo) the mean clamped
  log-ratio. Reads the mask (1 B/token) and for gspo two log-probs.
- ``tokens_kernel``: one program per ``BLOCK_TOKENS`` tokens of a slice. Each token finds its sequence
  (``g // T`` for padded input, a binary search of the offsets for packed), reads the per-sequence weights
  and writes its gradients and, per program, ``len(PARTIALS)`` partial sums (no atomics: a fixed-order
  combine later). Bytes-moved floor per token, fp32, everything on: forward reads logp, old_logp,
  advantages, ref_logp, entropy, IS weights and the mask (25 B); a gradient pass also writes two gradients
  (33 B).
- ``finish_kernel``: one program combines the partial sums in a fixed order (fp64) into the loss and the
  metrics.
Scalar options arrive as fp32 arguments (fp64 kernels upcast them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrlhf.kernels.partials import combine_partials

# Codes shared with fastrlhf/ops/policy_loss.py (LOSS_TYPES, KL_ESTIMATORS, PARTIALS).
PPO, GSPO, CISPO, SAPO, REINFORCE = (tl.constexpr(code) for code in range(5))
K1, ABS, K2, K3 = (tl.constexpr(code) for code in range(4))
NUM_PARTIALS = tl.constexpr(13)
PARTIALS_PAD = 16
BLOCK_TOKENS = 2048
NUM_WARPS = 8


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _inside(x, lo, hi):
    """The gradient of clamp: 1 where lo <= x <= hi (0 outside and for NaN)."""
    return tl.where((x >= lo) & (x <= hi), 1.0, 0.0)


@triton.jit
def _policy_terms(lp, old, adv, seq_lr, lower, upper, dual_clip, tau_pos, tau_neg, LOSS_TYPE: tl.constexpr,
                  HAS_DUAL: tl.constexpr):
    """Per token: loss, d loss / d logp, the ratio, and the clipped / low / high / dual indicators."""
    d = lp - old
    log_ratio = _clamp(d, -20.0, 20.0)
    dlog = _inside(d, -20.0, 20.0)
    if LOSS_TYPE == GSPO:
        log_ratio = tl.minimum(seq_lr, 10.0)
        dlog = tl.where(seq_lr <= 10.0, 1.0, 0.0)
    r = tl.exp(log_ratio)
    dr = r * dlog
    zero = tl.zeros_like(r)
    clipped = zero
    low = zero
    high = zero
    dual = zero
    if LOSS_TYPE == REINFORCE:
        loss = -adv * lp
        slope = -adv
    elif LOSS_TYPE == SAPO:
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        loss = -adv * gate * (4.0 / tau)
        slope = -adv * 4.0 * gate * (1.0 - gate) * dr
    else:
        rc = _clamp(r, lower, upper)
        low = tl.where((r < lower) & (adv < 0), 1.0, 0.0)
        high = tl.where((r > upper) & (adv > 0), 1.0, 0.0)
        if LOSS_TYPE == CISPO:
            loss = -rc * adv * lp
            slope = -rc * adv
            clipped = tl.where((r < lower) | (r > upper), 1.0, 0.0)
        else:
            p1 = -adv * r
            p2 = -adv * rc
            is_clipped = p2 > p1
            clipped = tl.where(is_clipped, 1.0, 0.0)
            loss = tl.where(is_clipped, p2, p1)
            slope = tl.where(is_clipped, -adv * dr * _inside(r, lower, upper), -adv * dr)
            if HAS_DUAL:
                p3 = -adv * dual_clip
                is_dual = (adv < 0) & (loss > p3)
                dual = tl.where(is_dual, 1.0, 0.0)
                loss = tl.where(is_dual, p3, loss)
                slope = tl.where(is_dual, 0.0, slope)
    return loss, slope, r, clipped, low, high, dual


@triton.jit
def _kl_terms(lp, ref, KL_ESTIMATOR: tl.constexpr, KL_STRAIGHT: tl.constexpr):
    """verl's kl_penalty of logp against ref and the gradient it back-propagates."""
    x = lp - ref
    if KL_ESTIMATOR == K1:
        value = x
        slope = tl.full(x.shape, 1.0, x.dtype)
    elif KL_ESTIMATOR == ABS:
        value = tl.abs(x)
        slope = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    elif KL_ESTIMATOR == K2:
        value = x * x / 2.0
        slope = x
    else:
        k = _clamp(-x, -20.0, 20.0)
        e = tl.exp(k)
        raw = e - k - 1.0
        value = _clamp(raw, -10.0, 10.0)
        slope = (1.0 - e) * _inside(-x, -20.0, 20.0) * _inside(raw, -10.0, 10.0)
    if KL_STRAIGHT:
        slope = x
    return value, slope


@triton.jit
def tokens_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, isw_ptr, offsets_ptr, weights_ptr,
                  seq_lr_ptr, grad_scale_ptr, grad_lp_ptr, grad_ent_ptr, partials_ptr, n, first, rows, row_length,
                  search_steps, lower, upper, dual_clip, tau_pos, tau_neg, kl_coef, entropy_coef,
                  LOSS_TYPE: tl.constexpr, HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
                  KL_STRAIGHT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr, HAS_ENT: tl.constexpr,
                  HAS_ISW: tl.constexpr, ADV_PER_SEQ: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  WRITE_GRADS: tl.constexpr, PADDED: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if lp_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    g = first + i
    if PADDED:
        seq = g // row_length
    else:  # the last sequence that starts at or before g (empty sequences are skipped over)
        lo = tl.zeros([BLOCK], tl.int64)
        hi = tl.zeros([BLOCK], tl.int64) + rows - 1
        for _ in range(0, search_steps):
            mid = (lo + hi + 1) // 2
            starts_before = tl.load(offsets_ptr + mid, mask=live, other=0) <= g
            lo = tl.where(starts_before, mid, lo)
            hi = tl.where(starts_before, hi, mid - 1)
        seq = lo
    seq = tl.where(live, seq, 0)
    keep = live
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + i, mask=live, other=0) != 0)
    # Masked loads: a masked token is never read, so NaN or inf there changes nothing.
    lp = tl.load(lp_ptr + i, mask=keep, other=0.0).to(ACC)
    old = tl.load(old_ptr + i, mask=keep, other=0.0).to(ACC)
    if ADV_PER_SEQ:
        adv = tl.load(adv_ptr + seq, mask=keep, other=0.0).to(ACC)
    else:
        adv = tl.load(adv_ptr + i, mask=keep, other=0.0).to(ACC)
    wp = tl.load(weights_ptr + seq, mask=keep, other=0.0).to(ACC)
    if LOSS_TYPE == GSPO:
        seq_lr = tl.load(seq_lr_ptr + seq, mask=keep, other=0.0).to(ACC)
    else:
        seq_lr = tl.zeros([BLOCK], ACC)
    loss, slope, r, clipped, low, high, dual = _policy_terms(lp, old, adv, seq_lr, lower, upper, dual_clip, tau_pos,
                                                             tau_neg, LOSS_TYPE, HAS_DUAL)
    if HAS_ISW:
        w = tl.load(isw_ptr + i, mask=keep, other=0.0).to(ACC)
        loss = loss * w
        slope = slope * w
    policy = tl.where(keep, wp * loss, 0.0)
    grad = wp * slope
    kl = tl.zeros([BLOCK], ACC)
    if HAS_KL:
        ref = tl.load(ref_ptr + i, mask=keep, other=0.0).to(ACC)
        wk = tl.load(weights_ptr + rows + seq, mask=keep, other=0.0).to(ACC)
        value, kl_slope = _kl_terms(lp, ref, KL_ESTIMATOR, KL_STRAIGHT)
        kl = tl.where(keep, wk * value, 0.0)
        grad += kl_coef * wk * kl_slope
    ent = tl.zeros([BLOCK], ACC)
    if HAS_ENT:
        we = tl.load(weights_ptr + 2 * rows + seq, mask=keep, other=0.0).to(ACC)
        ent = tl.where(keep, we * tl.load(ent_ptr + i, mask=keep, other=0.0).to(ACC), 0.0)
    if WRITE_GRADS:
        scale = tl.full([], 1.0, ACC)
        if HAS_GRAD_SCALE:
            scale = tl.load(grad_scale_ptr).to(ACC)
        tl.store(grad_lp_ptr + i, tl.where(keep, scale * grad, 0.0).to(grad_lp_ptr.dtype.element_ty), mask=live)
        if HAS_ENT:
            tl.store(grad_ent_ptr + i, tl.where(keep, -scale * entropy_coef * we, 0.0).to(
                grad_ent_ptr.dtype.element_ty), mask=live)
    log_ratio = _clamp(lp - old, -20.0, 20.0)
    approx = _clamp(tl.exp(-log_ratio) + log_ratio - 1.0, -10.0, 10.0)
    base = partials_ptr + pid.to(tl.int64) * NUM_PARTIALS
    tl.store(base + 0, tl.sum(policy, 0))
    tl.store(base + 1, tl.sum(kl, 0))
    tl.store(base + 2, tl.sum(ent, 0))
    tl.store(base + 3, tl.sum(tl.where(keep, 1.0, 0.0).to(ACC), 0))
    tl.store(base + 4, tl.sum(tl.where(keep, clipped, 0.0), 0))
    tl.store(base + 5, tl.sum(tl.where(keep, low, 0.0), 0))
    tl.store(base + 6, tl.sum(tl.where(keep, high, 0.0), 0))
    tl.store(base + 7, tl.sum(tl.where(keep, dual, 0.0), 0))
    tl.store(base + 8, tl.sum(tl.where(keep, -log_ratio, 0.0), 0))
    tl.store(base + 9, tl.sum(tl.where(keep, approx, 0.0), 0))
    tl.store(base + 10, tl.sum(tl.where(keep, r, 0.0), 0))
    tl.store(base + 11, tl.min(tl.where(keep, r, float("inf")), 0))
    tl.store(base + 12, tl.max(tl.where(keep, r, -float("inf")), 0))


@triton.jit
def sequences_kernel(lp_ptr, old_ptr, mask_ptr, offsets_ptr, counts_ptr, seq_lr_ptr, HAS_MASK: tl.constexpr,
                     HAS_LOGP: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = counts_ptr.dtype.element_ty
    s = tl.program_id(0)
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    count = tl.zeros([BLOCK], ACC)
    total = tl.zeros([BLOCK], ACC)
    for tile in range(start, end, BLOCK):
        i = tile + tl.arange(0, BLOCK)
        keep = i < end
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + i, mask=keep, other=0) != 0)
        count += tl.where(keep, 1.0, 0.0)
        if HAS_LOGP:
            lp = tl.load(lp_ptr + i, mask=keep, other=0.0).to(ACC)
            old = tl.load(old_ptr + i, mask=keep, other=0.0).to(ACC)
            total += tl.where(keep, _clamp(lp - old, -20.0, 20.0), 0.0)
    c = tl.sum(count, 0)
    tl.store(counts_ptr + s, c)
    if HAS_LOGP:
        tl.store(seq_lr_ptr + s, tl.sum(total, 0) / tl.maximum(c, 1.0))


@triton.jit
def finish_kernel(partials_ptr, loss_ptr, metrics_ptr, num_rows, kl_coef, entropy_coef, BLOCK_K: tl.constexpr,
                  PAD: tl.constexpr):
    col = tl.arange(0, PAD)
    # ratio_min and ratio_max ignore NaN.
    total = combine_partials(partials_ptr, num_rows, NUM_PARTIALS, 11, 12, False, BLOCK_K, PAD)
    policy = tl.sum(tl.where(col == 0, total, 0.0), 0)
    kl = tl.sum(tl.where(col == 1, total, 0.0), 0)
    ent = tl.sum(tl.where(col == 2, total, 0.0), 0)
    tokens = tl.sum(tl.where(col == 3, total, 0.0), 0)
    tl.store(loss_ptr, (policy + kl_coef * kl - entropy_coef * ent).to(loss_ptr.dtype.element_ty))
    norm = tl.where(tokens > 0, 1.0 / tl.maximum(tokens, 1.0), 0.0)
    metric = tl.where(col < 3, total, tl.where(col < 11, total * norm, tl.where(tokens > 0, total, 0.0)))
    # Metric k is partial k for k < 3 and partial k + 1 after (the token count is dropped).
    out = tl.where(col < 3, col, col - 1)
    tl.store(metrics_ptr + out, metric.to(tl.float32), mask=(col != 3) & (col < NUM_PARTIALS))


def _optional(t, like):
    # Triton needs a pointer for every argument; a HAS_* constexpr keeps the kernel from reading it.
    return like if t is None else t


def policy_loss_tokens(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, offsets, row_length,
                       first, advantages_per_sequence, seq_weights, seq_log_ratio, grad_scale, loss_type, lower, upper,
                       dual_clip, tau_pos, tau_neg, kl_estimator, kl_straight, kl_coef, entropy_coef, grad_logp,
                       grad_entropy, partials):
    """Launches ``tokens_kernel``; arguments as ``torch.ops.fastrlhf_cpp.policy_loss_tokens``."""
    n = logp.numel()
    if n == 0:
        return
    rows = offsets.numel() - 1
    tokens_kernel[(triton.cdiv(n, BLOCK_TOKENS),)](
        logp, old_logp, advantages, _optional(mask, logp), _optional(ref_logp, logp), _optional(entropy, logp),
        _optional(is_weights, logp), offsets, seq_weights, _optional(seq_log_ratio, seq_weights),
        _optional(grad_scale, seq_weights), _optional(grad_logp, logp), _optional(grad_entropy, logp), partials, n,
        first, rows, max(row_length, 1), max(1, rows.bit_length()), lower, upper, dual_clip, tau_pos, tau_neg,
        kl_coef, entropy_coef, LOSS_TYPE=loss_type, HAS_DUAL=dual_clip > 0, KL_ESTIMATOR=kl_estimator,
        KL_STRAIGHT=kl_straight, HAS_MASK=mask is not None, HAS_KL=ref_logp is not None,
        HAS_ENT=entropy is not None, HAS_ISW=is_weights is not None, ADV_PER_SEQ=advantages_per_sequence,
        HAS_GRAD_SCALE=grad_scale is not None, WRITE_GRADS=grad_logp is not None, PADDED=row_length > 0,
        BLOCK=BLOCK_TOKENS, num_warps=NUM_WARPS)


def policy_loss_sequences(logp, old_logp, mask, offsets, n, counts, seq_log_ratio):
    """Launches ``sequences_kernel``; arguments as ``torch.ops.fastrlhf_cpp.policy_loss_sequences``."""
    rows = offsets.numel() - 1
    has_logp = seq_log_ratio is not None
    like = counts if logp is None else logp
    sequences_kernel[(rows,)](
        _optional(logp, like), _optional(old_logp, like), _optional(mask, like), offsets, counts,
        _optional(seq_log_ratio, counts), HAS_MASK=mask is not None, HAS_LOGP=has_logp, BLOCK=1024,
        num_warps=4)


def policy_loss_finish(partials, kl_coef, entropy_coef, loss, metrics):
    """Launches ``finish_kernel``; arguments as ``torch.ops.fastrlhf_cpp.policy_loss_finish``."""
    finish_kernel[(1,)](partials, loss, metrics, partials.shape[0], kl_coef, entropy_coef, BLOCK_K=64,
                        PAD=PARTIALS_PAD, num_warps=4)


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: forward and backward of ``fastrlhf.policy_loss`` as
    trainers call it (ppo with dual clip, k3 KL and an entropy bonus; gspo with per-sequence advantages; packed
    cispo), fp32 and bf16, so the compiled variants are those these launch."""
    import torch

    import fastrlhf

    def launch(loss_type, dtype, packed):
        def run():
            shape = (96,) if packed else (4, 24)
            logp, entropy = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(2))
            old, ref = (torch.randn(shape).to(dtype) for _ in range(2))
            advantages = torch.randn(shape[0] if loss_type == "gspo" and not packed else shape).to(dtype)
            extra = {"cu_seqlens": torch.tensor([0, 30, 70, 96])} if packed else {}
            loss, _ = fastrlhf.policy_loss(logp, old, advantages, torch.rand(shape) < 0.9, loss_type=loss_type,
                                           dual_clip=3.0 if loss_type == "ppo" else None, ref_logp=ref,
                                           kl_coef=0.1, entropy=entropy, entropy_coef=0.01,
                                           aggregation="seq-mean-token-mean", **extra)
            torch.autograd.grad(loss, (logp, entropy))
        return run

    return [(f"policy_loss {loss_type}{' packed' if packed else ''} {str(dtype).removeprefix('torch.')}",
             launch(loss_type, dtype, packed))
            for dtype in (torch.float32, torch.bfloat16)
            for loss_type, packed in (("ppo", False), ("gspo", False), ("cispo", True))]
