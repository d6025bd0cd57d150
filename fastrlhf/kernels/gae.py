"""Triton kernels of ``fastrlhf.gae``: the reverse GAE recurrence as tiled associative scans.

Each program owns ``BLOCK_S`` sequences and walks their time axis in tiles of ``BLOCK_T`` positions,
aligned to each sequence's end (forward) or start (backward), so loads are coalesced along time and any
length works. Within a tile every chain is a linear recurrence ``x_t = a_t x_{t+1} + b_t``, solved by
``tl.associative_scan`` over the affine maps ``(a, b)``; the value at the tile's edge is carried into the
next tile. Masked positions, positions outside a sequence and ``dones`` cuts are all expressed through
``(a, b)``: an identity map ``(1, 0)`` makes a position transparent, ``a = CUT`` cuts the chain (selects,
so NaN or inf beyond a cut never crosses it).

Short sequences (T <= ``BLOCK_T``) get one tile and many sequences per program; long ones get few
sequences per program and many tiles, so both keep a program's tile near 2k elements.
"""

from __future__ import annotations

import triton
import triton.language as tl

TILE_ELEMENTS = 2048
MAX_BLOCK_T = 1024
# 8 positions per thread: five fp32 chains per position stay in registers without spilling.
NUM_WARPS = 8
# Offsets validated per step of the check every program makes of the whole offsets tensor.
OFFSET_BLOCK = tl.constexpr(1024)


# A position's map is x -> a x + b, or, where the chain is cut (a dones boundary, or a step that replaces
# the carried value), the constant x -> b, encoded as a = CUT. Valid coefficients are >= 0 (gamma and lam
# in [0, 1]; invalid ones are NaN), so the sign tells the two apart. A cut selects instead of multiplying
# by 0: 0 * NaN is NaN, and NaN or inf on the far side of a cut must not reach this side.
CUT = tl.constexpr(-1.0)
NAN = tl.constexpr(float("nan"))


@triton.jit
def _compose(a_acc, b_acc, a, b):
    # The map accumulated from the scan's origin, then this position's map: x = a (a_acc c + b_acc) + b.
    cut = a < 0
    return tl.where(cut | (a_acc < 0), CUT, a_acc * a), tl.where(cut, b, b_acc * a + b)


@triton.jit
def _apply(a, b, carry):
    """The composed map ``(a, b)`` applied to the value carried in from the previous tile."""
    return tl.where(a < 0, b, a * carry[:, None] + b)


@triton.jit
def _edge(x, j, edge: tl.constexpr):
    """The value of each row of ``x`` at tile column ``edge`` (a [BLOCK_S] vector)."""
    return tl.sum(tl.where(j[None, :] == edge, x, 0.0), axis=1)


@triton.jit
def _sequences(offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr, num_seqs, n, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """This program's sequences: ``seq`` (their ids), ``live``, ``start``/``end`` (clamped into [0, n]),
    gamma, gamma * lam and gamma * returns_lam, and ``poisoned``: their outputs must be NaN.

    Offsets are validated here, not on the host (that would be a device sync): if they do not run from 0
    to n without decreasing, every sequence is poisoned. The first sequence then starts at 0 and the last
    ends at n, so the clamped ranges still cover every element and none reaches outside. A sequence whose
    coefficients lie outside [0, 1] is poisoned alone."""
    seq = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    live = seq < num_seqs
    broken = (tl.load(offsets_ptr) != 0) | (tl.load(offsets_ptr + num_seqs) != n)
    for first in range(0, num_seqs, OFFSET_BLOCK):
        i = first + tl.arange(0, OFFSET_BLOCK)
        lo = tl.load(offsets_ptr + i, mask=i < num_seqs, other=0)
        hi = tl.load(offsets_ptr + i + 1, mask=i < num_seqs, other=0)
        broken |= tl.max((lo > hi).to(tl.int32), axis=0) != 0
    start = tl.where(seq == 0, 0, tl.minimum(tl.maximum(tl.load(offsets_ptr + seq, mask=live, other=0), 0), n))
    end = tl.where(seq == num_seqs - 1, n, tl.minimum(tl.maximum(tl.load(offsets_ptr + seq + 1, mask=live, other=0),
                                                                 0), n))
    end = tl.maximum(end, start)
    gamma = tl.load(gamma_ptr + seq, mask=live, other=0.0).to(ACC)
    lam = tl.load(lam_ptr + seq, mask=live, other=0.0).to(ACC)
    lam_r = tl.load(lam_r_ptr + seq, mask=live, other=0.0).to(ACC)
    coefficients_ok = (gamma >= 0) & (gamma <= 1) & (lam >= 0) & (lam <= 1) & (lam_r >= 0) & (lam_r <= 1)
    return seq, live, start, end, gamma, gamma * lam, gamma * lam_r, broken | ~coefficients_ok


@triton.jit
def _flags(mask_ptr, dones_ptr, pos, inside, HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr,
           ZERO_MASKED: tl.constexpr):
    """Per position: ``keep`` (unmasked and inside), ``step`` (takes a GAE step), ``cut`` (done)."""
    if HAS_MASK:
        keep = (tl.load(mask_ptr + pos, mask=inside, other=0) != 0) & inside
    else:
        keep = inside
    if ZERO_MASKED:
        step = inside
    else:
        step = keep
    if HAS_DONES:
        cut = (tl.load(dones_ptr + pos, mask=inside, other=0) != 0) & inside
    else:
        cut = tl.zeros(pos.shape, tl.int1)
    return keep, step, cut


@triton.jit
def _value(v_ptr, pos, inside, keep, ZERO_MASKED: tl.constexpr, ACC: tl.constexpr):
    """The value a position contributes: zero mode reads 0 where masked, skip mode the stored value."""
    v = tl.load(v_ptr + pos, mask=inside, other=0.0).to(ACC)
    if ZERO_MASKED:
        v = tl.where(keep, v, 0.0)
    return v


@triton.jit
def gae_forward_kernel(r_ptr, v_ptr, mask_ptr, dones_ptr, boot_ptr, offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                       adv_ptr, ret_ptr, num_seqs, n, HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr,
                       HAS_BOOT: tl.constexpr, ZERO_MASKED: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if r_ptr.dtype.element_ty == tl.float64 else tl.float32
    seq, live, start, end, gamma, gl, gl_r, poisoned = _sequences(offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                                                                  num_seqs, n, BLOCK_S, ACC)
    if HAS_BOOT:
        next_value = tl.load(boot_ptr + seq, mask=live, other=0.0).to(ACC)
    else:
        next_value = tl.zeros([BLOCK_S], ACC)
    adv_carry = tl.zeros([BLOCK_S], ACC)
    adv_r_carry = tl.zeros([BLOCK_S], ACC)
    j = tl.arange(0, BLOCK_T)
    tiles = tl.max(tl.cdiv(end - start, BLOCK_T), axis=0)
    for k in range(0, tiles):
        pos = end[:, None] - (k + 1) * BLOCK_T + j[None, :]
        inside = pos >= start[:, None]
        keep, step, cut = _flags(mask_ptr, dones_ptr, pos, inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
        value = _value(v_ptr, pos, inside, keep, ZERO_MASKED, ACC)
        reward = tl.where(keep, tl.load(r_ptr + pos, mask=inside, other=0.0).to(ACC), 0.0)

        # The next value seen from t is the value of the nearest step after t: a chain over t + 1.
        nxt = pos + 1
        nxt_inside = inside & (nxt < end[:, None])
        keep1, step1, cut1 = _flags(mask_ptr, dones_ptr, nxt, nxt_inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
        value1 = _value(v_ptr, nxt, nxt_inside, keep1, ZERO_MASKED, ACC)
        a = tl.where(step1 | cut1, CUT, 1.0).to(ACC)
        b = tl.where(step1, value1, 0.0)
        na, nb = tl.associative_scan((a, b), 1, _compose, reverse=True)
        after = _apply(na, nb, next_value)
        seen = tl.where(cut, 0.0, after)

        delta = tl.where(step, reward + gamma[:, None] * seen - value, 0.0)
        a = tl.where(cut, CUT, tl.where(step, gl[:, None], 1.0)).to(ACC)
        aa, ab = tl.associative_scan((a, delta), 1, _compose, reverse=True)
        adv = _apply(aa, ab, adv_carry)
        a = tl.where(cut, CUT, tl.where(step, gl_r[:, None], 1.0)).to(ACC)
        ra, rb = tl.associative_scan((a, delta), 1, _compose, reverse=True)
        adv_r = _apply(ra, rb, adv_r_carry)

        tl.store(adv_ptr + pos, tl.where(poisoned[:, None], NAN, adv).to(adv_ptr.dtype.element_ty), mask=inside)
        tl.store(ret_ptr + pos, tl.where(poisoned[:, None], NAN, adv_r + value).to(ret_ptr.dtype.element_ty),
                 mask=inside)
        # The next tile ends just before column 0: carry the chains' values there.
        next_value = _edge(after, j, 0)
        adv_carry = _edge(adv, j, 0)
        adv_r_carry = _edge(adv_r, j, 0)


@triton.jit
def gae_backward_kernel(ga_ptr, gr_ptr, mask_ptr, dones_ptr, offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                        grad_r_ptr, grad_v_ptr, grad_b_ptr, num_seqs, n, HAS_MASK: tl.constexpr,
                        HAS_DONES: tl.constexpr, ZERO_MASKED: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if ga_ptr.dtype.element_ty == tl.float64 else tl.float32
    seq, live, start, end, gamma, gl, gl_r, poisoned = _sequences(offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                                                                  num_seqs, n, BLOCK_S, ACC)
    adv_carry = tl.zeros([BLOCK_S], ACC)
    adv_r_carry = tl.zeros([BLOCK_S], ACC)
    value_carry = tl.zeros([BLOCK_S], ACC)
    grad_boot = tl.zeros([BLOCK_S], ACC)
    j = tl.arange(0, BLOCK_T)
    tiles = tl.max(tl.cdiv(end - start, BLOCK_T), axis=0)
    for k in range(0, tiles):
        pos = start[:, None] + k * BLOCK_T + j[None, :]
        inside = pos < end[:, None]
        keep, step, cut = _flags(mask_ptr, dones_ptr, pos, inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
        g_adv = tl.load(ga_ptr + pos, mask=inside, other=0.0).to(ACC)
        g_ret = tl.load(gr_ptr + pos, mask=inside, other=0.0).to(ACC)

        # Adjoints of the advantage chains flow forward with the coefficient that linked t - 1 to t.
        prv = pos - 1
        prv_inside = inside & (prv >= start[:, None])
        _, step0, cut0 = _flags(mask_ptr, dones_ptr, prv, prv_inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
        a = tl.where(inside, tl.where(cut0, CUT, tl.where(step0, gl[:, None], 1.0)), 1.0).to(ACC)
        aa, ab = tl.associative_scan((a, g_adv), 1, _compose)
        h_adv = _apply(aa, ab, adv_carry)
        a = tl.where(inside, tl.where(cut0, CUT, tl.where(step0, gl_r[:, None], 1.0)), 1.0).to(ACC)
        ra, rb = tl.associative_scan((a, g_ret), 1, _compose)
        h_adv_r = _apply(ra, rb, adv_r_carry)
        g_delta = tl.where(step, h_adv + h_adv_r, 0.0)

        # u_t: the next-value adjoint that t passes to t + 1 (gamma * g_delta at a step, else relayed).
        a = tl.where(inside & (cut | step), CUT, 1.0).to(ACC)
        b = tl.where(cut, 0.0, gamma[:, None] * g_delta)
        ua, ub = tl.associative_scan((a, b), 1, _compose)
        u = _apply(ua, ub, value_carry)
        # A value at t receives u_{t-1}: shift u by one position through the grad_values buffer.
        tl.store(grad_v_ptr + pos, u.to(grad_v_ptr.dtype.element_ty), mask=inside)
        tl.debug_barrier()
        u_prev = tl.load(grad_v_ptr + prv, mask=prv_inside & (j[None, :] > 0), other=0.0).to(ACC)
        u_prev = tl.where(j[None, :] == 0, value_carry[:, None], u_prev)
        tl.debug_barrier()
        g_value = g_ret + tl.where(step, u_prev - g_delta, 0.0)
        if ZERO_MASKED:
            g_value = tl.where(keep, g_value, 0.0)
        g_reward = tl.where(poisoned[:, None], NAN, tl.where(keep, g_delta, 0.0))
        tl.store(grad_r_ptr + pos, g_reward.to(grad_r_ptr.dtype.element_ty), mask=inside)
        g_value = tl.where(poisoned[:, None], NAN, g_value)
        tl.store(grad_v_ptr + pos, g_value.to(grad_v_ptr.dtype.element_ty), mask=inside)
        grad_boot += tl.sum(tl.where(pos == end[:, None] - 1, u, 0.0), axis=1)
        adv_carry = _edge(h_adv, j, BLOCK_T - 1)
        adv_r_carry = _edge(h_adv_r, j, BLOCK_T - 1)
        value_carry = _edge(u, j, BLOCK_T - 1)
    grad_boot = tl.where(poisoned, NAN, grad_boot)
    tl.store(grad_b_ptr + seq, grad_boot.to(grad_b_ptr.dtype.element_ty), mask=live)


def _blocks(n: int, rows: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_T): tiles of up to TILE_ELEMENTS positions, shaped by the mean sequence length,
    with no more rows per program than there are sequences."""
    mean_length = max(1, n // max(rows, 1))
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(mean_length)))
    return max(1, min(TILE_ELEMENTS // block_t, triton.next_power_of_2(max(rows, 1)))), block_t


def _optional(t, like):
    # Triton needs a pointer for every argument; a HAS_* constexpr keeps the kernel from reading it.
    return like if t is None else t


def gae_forward(rewards, values, mask, dones, bootstrap_value, offsets, gamma, lam, returns_lam, zero_masked,
                advantages, returns):
    """Launches ``gae_forward_kernel``; arguments as ``torch.ops.fastrlhf.gae_forward`` (flat, checked)."""
    rows = offsets.numel() - 1
    block_s, block_t = _blocks(rewards.numel(), rows)
    gae_forward_kernel[(triton.cdiv(rows, block_s),)](
        rewards, values, _optional(mask, rewards), _optional(dones, rewards), _optional(bootstrap_value, rewards),
        offsets, gamma, lam, _optional(returns_lam, lam), advantages, returns, rows, rewards.numel(),
        HAS_MASK=mask is not None, HAS_DONES=dones is not None, HAS_BOOT=bootstrap_value is not None,
        ZERO_MASKED=zero_masked, BLOCK_S=block_s, BLOCK_T=block_t, num_warps=NUM_WARPS)


def gae_backward(grad_advantages, grad_returns, mask, dones, offsets, gamma, lam, returns_lam, zero_masked,
                 grad_rewards, grad_values, grad_bootstrap):
    """Launches ``gae_backward_kernel``; arguments as ``torch.ops.fastrlhf.gae_backward``."""
    rows = offsets.numel() - 1
    block_s, block_t = _blocks(grad_advantages.numel(), rows)
    gae_backward_kernel[(triton.cdiv(rows, block_s),)](
        grad_advantages, grad_returns, _optional(mask, grad_advantages), _optional(dones, grad_advantages),
        offsets, gamma, lam, _optional(returns_lam, lam), grad_rewards, grad_values, grad_bootstrap, rows,
        grad_advantages.numel(),
        HAS_MASK=mask is not None, HAS_DONES=dones is not None, ZERO_MASKED=zero_masked,
        BLOCK_S=block_s, BLOCK_T=block_t, num_warps=NUM_WARPS)


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: ``fastrlhf.gae`` forward and backward on CPU tensors
    like verl's batches (a response mask) and like truncated multi-episode rollouts (dones and a bootstrap
    value), short and long sequences, fp32 and bf16, so the compiled variants are those these launch."""
    import torch

    import fastrlhf

    def launch(B, T, dtype, rollout):
        def run():
            rewards, values = (torch.randn(B, T).to(dtype).requires_grad_() for _ in range(2))
            extra = {"dones": torch.rand(B, T) < 0.01, "bootstrap_value": torch.zeros(B, dtype=dtype)} if rollout else {}
            advantages, returns = fastrlhf.gae(rewards, values, torch.ones(B, T, dtype=torch.bool), gamma=0.99,
                                               lam=0.95, **extra)
            torch.autograd.grad((advantages.sum(), returns.sum()), (rewards, values))
        return run

    # Short sequences with a mask (verl), long truncated rollouts with dones and a bootstrap value.
    return [(f"gae B={B} T={T} {str(dtype).removeprefix('torch.')}{' dones+bootstrap' if rollout else ''}",
             launch(B, T, dtype, rollout))
            for dtype in (torch.float32, torch.bfloat16) for B, T, rollout in ((256, 512, False), (16, 16384, True))]
