"""Triton kernels of ``fastrlhf.gae``: the reverse GAE recurrence as tiled associative scans.

A program walks a stretch of a sequence in tiles of ``BLOCK_T`` positions, aligned to the stretch's end
(forward) or start (backward), so loads are coalesced along time and any length works. Within a tile every
chain is a linear recurrence ``x_t = a_t x_{t+1} + b_t``, solved by ``tl.associative_scan`` over the affine
maps ``(a, b)``; the value at the tile's edge is carried into the next tile. Masked positions, positions
outside the stretch and ``dones`` cuts are all expressed through ``(a, b)``: an identity map ``(1, 0)``
makes a position transparent, ``a = CUT`` cuts the chain (selects, so NaN or inf beyond a cut never
crosses it).

``_plan`` picks one of two layouts from the row count and the mean length:

* one pass, when the rows fill the GPU: each program owns ``BLOCK_S`` whole sequences (many short ones in
  one tile, or few long ones in many tiles).
* chunked, when they would not (B=64, T=8192 in one pass: 32 programs for 132 SMs): every sequence is cut
  into chunks of ``BLOCK_T`` positions, one program each, in three launches. ``gae_forward_summary_kernel``
  (``gae_backward_summary_kernel``) reduces each chunk to the affine map that takes the state entering it
  to the state leaving it; ``gae_carries_kernel`` scans each sequence's chunk maps (one program per
  sequence, an associative scan in a fixed order: deterministic, no atomics) into the state entering each
  chunk; ``gae_forward_kernel`` (``gae_backward_kernel``) rescans each chunk from that state and writes the
  outputs. The state that crosses a chunk edge is three values: forward the next value ``n`` and the two
  advantage chains ``x``, ``y``, where ``x' = X(x) + k n`` (the chunk's last step reads ``n``); backward the
  two advantage adjoints ``x``, ``y`` and the next-value adjoint ``u' = U(u) + k_x x + k_y y``. Both are
  kept as two pairs of a free chain and a chain coupled to it (``_compose_pair``); backward ``u`` is the
  sum of its two pairs' parts.

Bytes moved, per position (fp32 data, bool mask and dones): the floor is every input read once and every
output written once, 18 B forward (rewards, values, mask, dones in; advantages, returns out) and 18 B
backward (two upstream gradients, mask, dones in; two gradients out). One pass: the floor forward; the
backward also stores u to grad_values and reads it back one position later before the gradient
overwrites it (+8 B, from L1/L2). The flags at t + 1 (t - 1) are re-read from cache. Chunked reads the
inputs twice (chunk maps, then the rescan): 28 B forward (1.56x the floor), 36 B backward, plus 14
floats per chunk of ``BLOCK_T`` positions written and read (under 2 % at ``BLOCK_T`` = 256, 0.5 % at
1024). The second read of a batch that fits in L2 (B=64 T=8192 fp32: 5 MB of inputs; H100/H200: 50 MB)
comes from L2, not HBM. The chunked grid has up to ``rows`` programs that find no chunk and exit (every
sequence may end in a partial chunk, which the host cannot know without a sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 512
MAX_BLOCK_T = 1024
# Up to 4 positions per thread (2 where a program takes several rows, whose layouts cost more): the
# chains stay in registers without spilling, under 128 per thread on sm_90.
NUM_WARPS = 8
# Offsets validated per step of the check every program makes of the whole offsets tensor.
OFFSET_BLOCK = tl.constexpr(1024)
# Chunked when one pass would give fewer programs than this (2 per SM of a 132-SM GPU) and the sequences
# are long enough for chunks of at least MIN_CHUNK positions; chunk programs read every sequence's
# offsets at once, so at most MAX_CHUNKED_ROWS - 1 sequences.
MIN_PROGRAMS = 264
MIN_CHUNK = 256
MAX_CHUNKED_ROWS = 1024
# Chunks per step of gae_carries_kernel's scan of one sequence.
CARRY_BLOCK = 256


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
def _compose_coupled(a_acc, b_acc, k_acc, a, b, k):
    """``_compose`` for maps that also read an outside value n: x -> a x + b + k n, with k = CUT where
    the map does not read n at all (a select again: 0 * NaN must not appear where n is cut off)."""
    a_new, b_new = _compose(a_acc, b_acc, a, b)
    return a_new, b_new, tl.where((a < 0) | (k_acc < 0), k, a * k_acc + tl.where(k < 0, 0.0, k))


@triton.jit
def _compose_pair(fa_acc, fb_acc, ca_acc, cb_acc, ck_acc, fa, fb, ca, cb, ck):
    """A chunk's map of a pair of chains: the free chain f -> (fa, fb) and the coupled chain
    c -> ca c + cb + ck f, which reads f as it enters the chunk. Composed after the accumulated maps, this
    map's f is the accumulated free chain's output, fa_acc f + fb_acc."""
    k = tl.where((ck < 0) | (fa_acc < 0), CUT, ck * fa_acc)
    b = tl.where(ck < 0, cb, cb + ck * fb_acc)
    a_new, b_new, k_new = _compose_coupled(ca_acc, cb_acc, ck_acc, ca, b, k)
    fa_new, fb_new = _compose(fa_acc, fb_acc, fa, fb)
    return fa_new, fb_new, a_new, b_new, k_new


@triton.jit
def _apply(a, b, x):
    """The map ``(a, b)`` applied to ``x`` (a value carried in from outside the scan)."""
    return tl.where(a < 0, b, a * x + b)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _edge(x, j, edge: tl.constexpr):
    """The value of each row of ``x`` at tile column ``edge`` (a [BLOCK_S] vector)."""
    return tl.sum(tl.where(j[None, :] == edge, x, 0.0), axis=1)


@triton.jit
def _coefficients(seq, live, gamma_ptr, lam_ptr, lam_r_ptr, ACC: tl.constexpr):
    """gamma, gamma * lam and gamma * returns_lam of sequences ``seq``, and whether all lie in [0, 1]."""
    gamma = tl.load(gamma_ptr + seq, mask=live, other=0.0).to(ACC)
    lam = tl.load(lam_ptr + seq, mask=live, other=0.0).to(ACC)
    lam_r = tl.load(lam_r_ptr + seq, mask=live, other=0.0).to(ACC)
    ok = (gamma >= 0) & (gamma <= 1) & (lam >= 0) & (lam <= 1) & (lam_r >= 0) & (lam_r <= 1)
    return gamma, gamma * lam, gamma * lam_r, ok


@triton.jit
def _sequences(offsets_ptr, num_seqs, n, BLOCK_S: tl.constexpr):
    """One pass: this program's sequences ``seq`` (their ids), ``live``, ``start``/``end`` (clamped into
    [0, n]) and ``broken``.

    Offsets are validated here, not on the host (that would be a device sync): if they do not run from 0
    to n without decreasing, every sequence is poisoned. The first sequence then starts at 0 and the last
    ends at n, so the clamped ranges still cover every element and none reaches outside."""
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
    return seq, live, start.to(tl.int64), tl.maximum(end, start).to(tl.int64), broken


@triton.jit
def _chunk_table(offsets_ptr, num_seqs, n, CHUNK: tl.constexpr, ROWS: tl.constexpr):
    """Chunked: every sequence's ``start``/``end``, its number of chunks (at least one, so an empty
    sequence still has a program to write its bootstrap gradient) and one past its last chunk's index
    ([ROWS] vectors; lanes from num_seqs on hold no chunks), and whether the offsets are broken.

    The ranges partition [0, n) whatever the offsets hold (a running maximum of the clamped offsets):
    valid offsets are a partition already; broken ones (every output NaN) still get each element written
    once and none outside, and there are never more than n // CHUNK + num_seqs chunks (the grid)."""
    i = tl.arange(0, ROWS)
    live = i < num_seqs
    lo = tl.load(offsets_ptr + i, mask=live, other=0).to(tl.int64)
    hi = tl.load(offsets_ptr + i + 1, mask=live, other=0).to(tl.int64)
    broken = ((tl.load(offsets_ptr) != 0) | (tl.load(offsets_ptr + num_seqs) != n)
              | (tl.max((lo > hi).to(tl.int32), axis=0) != 0))
    start = tl.associative_scan(tl.where(i == 0, 0, tl.minimum(tl.maximum(lo, 0), n)), 0, _maximum)
    end = tl.where(i == num_seqs - 1, n, tl.maximum(start, tl.minimum(tl.maximum(hi, 0), n)))
    count = tl.where(live, tl.maximum(tl.cdiv(end - start, CHUNK), 1), 0)
    return start, end, count, tl.cumsum(count, 0), broken


@triton.jit
def _pick(x, mine):
    """Per row of the [R, ROWS] ``mine``, the lane of the [ROWS] vector ``x`` it marks (0 if none)."""
    return tl.sum(tl.where(mine, x[None, :], 0), axis=1)


@triton.jit
def _program_rows(offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr, num_seqs, n, CHUNKED: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    """What this program scans, as [BLOCK_S] vectors: ``seq``, ``live``, positions ``lo``..``hi`` of each,
    the whole sequences' ``start``/``end`` (flags across the stretch's edges are read), ``last`` (the
    stretch ends its sequence), gamma, gamma * lam, gamma * returns_lam and ``poisoned`` (outputs NaN:
    broken offsets, or this sequence's coefficients outside [0, 1]). One pass: whole sequences. Chunked
    (BLOCK_S = 1): chunk ``program_id`` of the sequences' chunks in order, BLOCK_T positions each."""
    if CHUNKED:
        start, end, count, after, broken = _chunk_table(offsets_ptr, num_seqs, n, BLOCK_T, ROWS)
        g = tl.program_id(0)
        # [1, ROWS]: the sequence of chunk g is the one whose chunks end first after g.
        seq = tl.sum((after[None, :] <= g).to(tl.int32), axis=1)
        mine = tl.arange(0, ROWS)[None, :] == seq[:, None]
        live = seq < num_seqs
        after = _pick(after, mine)
        start, end = _pick(start, mine), _pick(end, mine)
        lo = start + (g - after + _pick(count, mine)) * BLOCK_T
        hi = tl.where(live, tl.minimum(lo + BLOCK_T, end), lo)
        last = g == after - 1
    else:
        seq, live, start, end, broken = _sequences(offsets_ptr, num_seqs, n, BLOCK_S)
        lo, hi, last = start, end, live
    gamma, gl, gl_r, ok = _coefficients(seq, live, gamma_ptr, lam_ptr, lam_r_ptr, ACC)
    return seq, live, lo, hi, start, end, last, gamma, gl, gl_r, broken | ~ok


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
def _chain(cut, step, coefficient, ACC: tl.constexpr):
    """An advantage chain's maps: cut at a done, ``coefficient`` at a step, transparent elsewhere."""
    return tl.where(cut, CUT, tl.where(step, coefficient[:, None], 1.0)).to(ACC)


@triton.jit
def _forward_tile(r_ptr, v_ptr, mask_ptr, dones_ptr, pos, inside, end, HAS_MASK: tl.constexpr,
                  HAS_DONES: tl.constexpr, ZERO_MASKED: tl.constexpr, ACC: tl.constexpr):
    """A forward tile's ``step``, ``cut``, ``value``, ``reward`` and the next-value chain's maps: the next
    value seen from t is the value of the nearest step after t, a chain over t + 1 (which may lie beyond
    the tile, up to the sequence's ``end``)."""
    keep, step, cut = _flags(mask_ptr, dones_ptr, pos, inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
    value = _value(v_ptr, pos, inside, keep, ZERO_MASKED, ACC)
    reward = tl.where(keep, tl.load(r_ptr + pos, mask=inside, other=0.0).to(ACC), 0.0)
    nxt = pos + 1
    nxt_inside = inside & (nxt < end[:, None])
    keep1, step1, cut1 = _flags(mask_ptr, dones_ptr, nxt, nxt_inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
    value1 = _value(v_ptr, nxt, nxt_inside, keep1, ZERO_MASKED, ACC)
    return step, cut, value, reward, tl.where(step1 | cut1, CUT, 1.0).to(ACC), tl.where(step1, value1, 0.0)


@triton.jit
def _delta(step, cut, reward, value, gamma, after):
    """The TD error at each step, from ``after``, the next value seen (none across a cut)."""
    return tl.where(step, reward + gamma[:, None] * tl.where(cut, 0.0, after) - value, 0.0)


@triton.jit
def gae_forward_kernel(r_ptr, v_ptr, mask_ptr, dones_ptr, boot_ptr, offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                       carries_ptr, adv_ptr, ret_ptr, num_seqs, n, carries_stride, HAS_MASK: tl.constexpr,
                       HAS_DONES: tl.constexpr, HAS_BOOT: tl.constexpr, ZERO_MASKED: tl.constexpr,
                       CHUNKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """Advantages and returns: whole sequences (one pass), or a chunk from the state that
    ``gae_carries_kernel`` left in ``carries_ptr`` (next value, -, advantage, returns-lambda advantage)."""
    ACC: tl.constexpr = tl.float64 if r_ptr.dtype.element_ty == tl.float64 else tl.float32
    seq, live, lo, hi, start, end, last, gamma, gl, gl_r, poisoned = _program_rows(
        offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr, num_seqs, n, CHUNKED, ROWS, BLOCK_S, BLOCK_T, ACC)
    if CHUNKED:
        chunk = tl.program_id(0)
        next_value = tl.load(carries_ptr + chunk + tl.zeros([1], tl.int32), mask=live, other=0.0)
        adv_carry = tl.load(carries_ptr + carries_stride + chunk + tl.zeros([1], tl.int32), mask=live, other=0.0)
        adv_r_carry = tl.load(carries_ptr + 3 * carries_stride + chunk + tl.zeros([1], tl.int32), mask=live,
                              other=0.0)
    else:
        if HAS_BOOT:
            next_value = tl.load(boot_ptr + seq, mask=live, other=0.0).to(ACC)
        else:
            next_value = tl.zeros([BLOCK_S], ACC)
        adv_carry = tl.zeros([BLOCK_S], ACC)
        adv_r_carry = tl.zeros([BLOCK_S], ACC)
    j = tl.arange(0, BLOCK_T)
    tiles = tl.max(tl.cdiv(hi - lo, BLOCK_T), axis=0)
    for k in range(0, tiles):
        pos = hi[:, None] - (k + 1) * BLOCK_T + j[None, :]
        inside = pos >= lo[:, None]
        step, cut, value, reward, a, b = _forward_tile(r_ptr, v_ptr, mask_ptr, dones_ptr, pos, inside, end,
                                                       HAS_MASK, HAS_DONES, ZERO_MASKED, ACC)
        na, nb = tl.associative_scan((a, b), 1, _compose, reverse=True)
        after = _apply(na, nb, next_value[:, None])
        delta = _delta(step, cut, reward, value, gamma, after)
        aa, ab = tl.associative_scan((_chain(cut, step, gl, ACC), delta), 1, _compose, reverse=True)
        adv = _apply(aa, ab, adv_carry[:, None])
        ra, rb = tl.associative_scan((_chain(cut, step, gl_r, ACC), delta), 1, _compose, reverse=True)
        adv_r = _apply(ra, rb, adv_r_carry[:, None])

        tl.store(adv_ptr + pos, tl.where(poisoned[:, None], NAN, adv).to(adv_ptr.dtype.element_ty), mask=inside)
        tl.store(ret_ptr + pos, tl.where(poisoned[:, None], NAN, adv_r + value).to(ret_ptr.dtype.element_ty),
                 mask=inside)
        # The next tile ends just before column 0: carry the chains' values there.
        next_value = _edge(after, j, 0)
        adv_carry = _edge(adv, j, 0)
        adv_r_carry = _edge(adv_r, j, 0)


@triton.jit
def _store_pair(at, stride, live, fa, fb, ca, cb, ck):
    """One pair map of a chunk (5 [1]-vectors at ``at``, ``stride`` apart), as ``_compose_pair`` reads it."""
    tl.store(at, fa, mask=live)
    tl.store(at + stride, fb, mask=live)
    tl.store(at + 2 * stride, ca, mask=live)
    tl.store(at + 3 * stride, cb, mask=live)
    tl.store(at + 4 * stride, ck, mask=live)


@triton.jit
def gae_forward_summary_kernel(r_ptr, v_ptr, mask_ptr, dones_ptr, offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                               summary_ptr, num_seqs, n, stride, HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr,
                               ZERO_MASKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Chunk ``program_id``'s map from the state at its end (next value n, advantages x and y) to the
    state at its start: n -> N(n), x -> X(x) + k_x n, y -> Y(y) + k_y n, stored as the pairs (N, X, k_x)
    and (N, Y, k_y) in ``summary_ptr`` ([10, stride]). The chunk is scanned with n = x = y = 0, which
    gives each map's constant; n reaches the advantages only through the TD error of the chunk's last
    step (factor gamma), carried to the chunk's start by the coupled scan."""
    ACC: tl.constexpr = tl.float64 if r_ptr.dtype.element_ty == tl.float64 else tl.float32
    seq, live, lo, hi, start, end, last, gamma, gl, gl_r, poisoned = _program_rows(
        offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr, num_seqs, n, True, ROWS, 1, BLOCK_T, ACC)
    j = tl.arange(0, BLOCK_T)
    pos = hi[:, None] - BLOCK_T + j[None, :]
    inside = pos >= lo[:, None]
    step, cut, value, reward, a, b = _forward_tile(r_ptr, v_ptr, mask_ptr, dones_ptr, pos, inside, end, HAS_MASK,
                                                   HAS_DONES, ZERO_MASKED, ACC)
    na, nb = tl.associative_scan((a, b), 1, _compose, reverse=True)
    delta = _delta(step, cut, reward, value, gamma, nb)
    k = tl.where(step & ~cut & ~(na < 0), gamma[:, None] * na, CUT).to(ACC)
    xa, xb, xk = tl.associative_scan((_chain(cut, step, gl, ACC), delta, k), 1, _compose_coupled, reverse=True)
    ya, yb, yk = tl.associative_scan((_chain(cut, step, gl_r, ACC), delta, k), 1, _compose_coupled, reverse=True)
    at = summary_ptr + tl.program_id(0) + tl.zeros([1], tl.int32)
    n_a, n_b = _edge(na, j, 0), _edge(nb, j, 0)
    _store_pair(at, stride, live, n_a, n_b, _edge(xa, j, 0), _edge(xb, j, 0), _edge(xk, j, 0))
    _store_pair(at + 5 * stride, stride, live, n_a, n_b, _edge(ya, j, 0), _edge(yb, j, 0), _edge(yk, j, 0))


@triton.jit
def _backward_tile(ga_ptr, gr_ptr, mask_ptr, dones_ptr, pos, inside, start, gl, gl_r, HAS_MASK: tl.constexpr,
                   HAS_DONES: tl.constexpr, ZERO_MASKED: tl.constexpr, ACC: tl.constexpr):
    """A backward tile's ``keep``, ``step``, ``cut``, upstream gradients and the maps of the two advantage
    adjoints, which flow forward with the coefficient that linked t - 1 to t (read before the tile, back
    to the sequence's ``start``)."""
    keep, step, cut = _flags(mask_ptr, dones_ptr, pos, inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
    g_adv = tl.load(ga_ptr + pos, mask=inside, other=0.0).to(ACC)
    g_ret = tl.load(gr_ptr + pos, mask=inside, other=0.0).to(ACC)
    prv = pos - 1
    prv_inside = inside & (prv >= start[:, None])
    _, step0, cut0 = _flags(mask_ptr, dones_ptr, prv, prv_inside, HAS_MASK, HAS_DONES, ZERO_MASKED)
    a_adv = tl.where(inside, _chain(cut0, step0, gl, ACC), 1.0).to(ACC)
    a_ret = tl.where(inside, _chain(cut0, step0, gl_r, ACC), 1.0).to(ACC)
    return keep, step, cut, g_adv, g_ret, a_adv, a_ret


@triton.jit
def _next_value_adjoint(inside, step, cut, gamma, g_delta, ACC: tl.constexpr):
    """Maps of u_t, the next-value adjoint that t passes to t + 1: gamma * g_delta at a step, 0 at a
    cut, relayed elsewhere."""
    return tl.where(inside & (cut | step), CUT, 1.0).to(ACC), tl.where(cut, 0.0, gamma[:, None] * g_delta)


@triton.jit
def gae_backward_kernel(ga_ptr, gr_ptr, mask_ptr, dones_ptr, offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                        carries_ptr, grad_r_ptr, grad_v_ptr, grad_b_ptr, num_seqs, n, carries_stride,
                        HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr, ZERO_MASKED: tl.constexpr,
                        CHUNKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """Gradients: whole sequences (one pass), or a chunk from the state that ``gae_carries_kernel`` left in
    ``carries_ptr`` (advantage adjoint, its part of u, returns-lambda adjoint, its part of u)."""
    ACC: tl.constexpr = tl.float64 if ga_ptr.dtype.element_ty == tl.float64 else tl.float32
    seq, live, lo, hi, start, end, last, gamma, gl, gl_r, poisoned = _program_rows(
        offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr, num_seqs, n, CHUNKED, ROWS, BLOCK_S, BLOCK_T, ACC)
    if CHUNKED:
        at = carries_ptr + tl.program_id(0) + tl.zeros([1], tl.int32)
        adv_carry = tl.load(at, mask=live, other=0.0)
        adv_r_carry = tl.load(at + 2 * carries_stride, mask=live, other=0.0)
        value_carry = (tl.load(at + carries_stride, mask=live, other=0.0)
                       + tl.load(at + 3 * carries_stride, mask=live, other=0.0))
    else:
        adv_carry = tl.zeros([BLOCK_S], ACC)
        adv_r_carry = tl.zeros([BLOCK_S], ACC)
        value_carry = tl.zeros([BLOCK_S], ACC)
    grad_boot = tl.zeros([BLOCK_S], ACC)
    j = tl.arange(0, BLOCK_T)
    tiles = tl.max(tl.cdiv(hi - lo, BLOCK_T), axis=0)
    for k in range(0, tiles):
        pos = lo[:, None] + k * BLOCK_T + j[None, :]
        inside = pos < hi[:, None]
        keep, step, cut, g_adv, g_ret, a_adv, a_ret = _backward_tile(ga_ptr, gr_ptr, mask_ptr, dones_ptr, pos, inside,
                                                                     start, gl, gl_r, HAS_MASK, HAS_DONES,
                                                                     ZERO_MASKED, ACC)
        aa, ab = tl.associative_scan((a_adv, g_adv), 1, _compose)
        h_adv = _apply(aa, ab, adv_carry[:, None])
        ra, rb = tl.associative_scan((a_ret, g_ret), 1, _compose)
        h_adv_r = _apply(ra, rb, adv_r_carry[:, None])
        g_delta = tl.where(step, h_adv + h_adv_r, 0.0)
        a, b = _next_value_adjoint(inside, step, cut, gamma, g_delta, ACC)
        ua, ub = tl.associative_scan((a, b), 1, _compose)
        u = _apply(ua, ub, value_carry[:, None])
        # A value at t receives u_{t-1}: shift u by one position through the grad_values buffer.
        prv = pos - 1
        tl.store(grad_v_ptr + pos, u.to(grad_v_ptr.dtype.element_ty), mask=inside)
        tl.debug_barrier()
        u_prev = tl.load(grad_v_ptr + prv, mask=inside & (j[None, :] > 0), other=0.0).to(ACC)
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
    tl.store(grad_b_ptr + seq, grad_boot.to(grad_b_ptr.dtype.element_ty), mask=live & last)


@triton.jit
def gae_backward_summary_kernel(ga_ptr, gr_ptr, mask_ptr, dones_ptr, offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr,
                                summary_ptr, num_seqs, n, stride, HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr,
                                ZERO_MASKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Chunk ``program_id``'s map from the state at its start (advantage adjoints x and y, next-value
    adjoint u) to the state at its end: x -> X(x), y -> Y(y), u -> U(u) + k_x x + k_y y, stored as the
    pairs (X, U, k_x) and (Y, U without its constant, k_y) in ``summary_ptr`` ([10, stride]), whose
    coupled parts add up to u. u at the end is set by the chunk's last step or cut t (if any): the
    factor of x there is gamma times x's coefficient at t."""
    ACC: tl.constexpr = tl.float64 if ga_ptr.dtype.element_ty == tl.float64 else tl.float32
    seq, live, lo, hi, start, end, last, gamma, gl, gl_r, poisoned = _program_rows(
        offsets_ptr, gamma_ptr, lam_ptr, lam_r_ptr, num_seqs, n, True, ROWS, 1, BLOCK_T, ACC)
    j = tl.arange(0, BLOCK_T)
    pos = lo[:, None] + j[None, :]
    inside = pos < hi[:, None]
    keep, step, cut, g_adv, g_ret, a_adv, a_ret = _backward_tile(ga_ptr, gr_ptr, mask_ptr, dones_ptr, pos, inside,
                                                                 start, gl, gl_r, HAS_MASK, HAS_DONES, ZERO_MASKED,
                                                                 ACC)
    xa, xb = tl.associative_scan((a_adv, g_adv), 1, _compose)
    ya, yb = tl.associative_scan((a_ret, g_ret), 1, _compose)
    a, b = _next_value_adjoint(inside, step, cut, gamma, tl.where(step, xb + yb, 0.0), ACC)
    ua, ub = tl.associative_scan((a, b), 1, _compose)
    setter = tl.max(tl.where(inside & (cut | step), j[None, :], -1), axis=1)
    reads = (j[None, :] == setter[:, None]) & step & ~cut
    xk = tl.sum(tl.where(reads & ~(xa < 0), gamma[:, None] * xa, 0.0), axis=1)
    xk = tl.where(tl.sum(tl.where(reads & ~(xa < 0), 1, 0), axis=1) > 0, xk, CUT).to(ACC)
    yk = tl.sum(tl.where(reads & ~(ya < 0), gamma[:, None] * ya, 0.0), axis=1)
    yk = tl.where(tl.sum(tl.where(reads & ~(ya < 0), 1, 0), axis=1) > 0, yk, CUT).to(ACC)
    at = summary_ptr + tl.program_id(0) + tl.zeros([1], tl.int32)
    u_a = _edge(ua, j, BLOCK_T - 1)
    _store_pair(at, stride, live, _edge(xa, j, BLOCK_T - 1), _edge(xb, j, BLOCK_T - 1), u_a,
                _edge(ub, j, BLOCK_T - 1), xk)
    _store_pair(at + 5 * stride, stride, live, _edge(ya, j, BLOCK_T - 1), _edge(yb, j, BLOCK_T - 1), u_a,
                tl.zeros([1], ACC), yk)


@triton.jit
def _load_pair(at, stride, has):
    """A chunk's pair map as ``_store_pair`` left it; the identity where ``has`` is false."""
    return (tl.load(at, mask=has, other=1.0), tl.load(at + stride, mask=has, other=0.0),
            tl.load(at + 2 * stride, mask=has, other=1.0), tl.load(at + 3 * stride, mask=has, other=0.0),
            tl.load(at + 4 * stride, mask=has, other=-1.0))


@triton.jit
def _scan_pair(at, stride, has, free, coupled, REVERSE: tl.constexpr):
    """The states (free, coupled) after each lane's map, the lanes' pair maps scanned in order."""
    fa, fb, ca, cb, ck = tl.associative_scan(_load_pair(at, stride, has), 0, _compose_pair, reverse=REVERSE)
    return _apply(fa, fb, free), _apply(ca, cb, coupled) + tl.where(ck < 0, 0.0, ck * free)


@triton.jit
def gae_carries_kernel(summary_ptr, carries_ptr, boot_ptr, offsets_ptr, num_seqs, n, stride, HAS_BOOT: tl.constexpr,
                       REVERSE: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """The state entering each chunk of sequence ``program_id``, as each pair's (free, coupled) values in
    ``carries_ptr`` ([4, stride]): the sequence's chunk maps (``summary_ptr``, two pairs) scanned from its
    end (REVERSE: the forward recurrence, from the bootstrap value and zeros) or its start (zeros),
    BLOCK_C chunks at a time, in a fixed order. Lane c holds the map of the chunk that the state crosses
    just before it enters chunk c, so the inclusive scan gives the state entering c."""
    ACC: tl.constexpr = summary_ptr.dtype.element_ty
    s = tl.program_id(0)
    _, _, count, after, _ = _chunk_table(offsets_ptr, num_seqs, n, CHUNK, ROWS)
    this = tl.arange(0, ROWS)[None, :] == s
    last = tl.sum(_pick(after, this), axis=0)
    first = last - tl.sum(_pick(count, this), axis=0)
    if HAS_BOOT:
        free = tl.load(boot_ptr + s).to(ACC)
    else:
        free = tl.zeros([], ACC)
    p_free, p_coupled, q_free, q_coupled = free, tl.zeros([], ACC), free, tl.zeros([], ACC)
    lane = tl.arange(0, BLOCK_C)
    for block in range(0, tl.cdiv(last - first, BLOCK_C)):
        if REVERSE:
            chunk = last - (block + 1) * BLOCK_C + lane
            crossed = chunk + 1
        else:
            chunk = first + block * BLOCK_C + lane
            crossed = chunk - 1
        has = (crossed >= first) & (crossed < last)
        p_free_c, p_coupled_c = _scan_pair(summary_ptr + crossed, stride, has, p_free, p_coupled, REVERSE)
        q_free_c, q_coupled_c = _scan_pair(summary_ptr + 5 * stride + crossed, stride, has, q_free, q_coupled,
                                           REVERSE)
        mine = (chunk >= first) & (chunk < last)
        tl.store(carries_ptr + chunk, p_free_c, mask=mine)
        tl.store(carries_ptr + stride + chunk, p_coupled_c, mask=mine)
        tl.store(carries_ptr + 2 * stride + chunk, q_free_c, mask=mine)
        tl.store(carries_ptr + 3 * stride + chunk, q_coupled_c, mask=mine)
        # The next block continues from this block's edge chunk.
        edge = 0 if REVERSE else BLOCK_C - 1
        at_edge = lane == edge
        p_free, p_coupled = tl.sum(tl.where(at_edge, p_free_c, 0.0), 0), tl.sum(tl.where(at_edge, p_coupled_c, 0.0), 0)
        q_free, q_coupled = tl.sum(tl.where(at_edge, q_free_c, 0.0), 0), tl.sum(tl.where(at_edge, q_coupled_c, 0.0), 0)


def _blocks(n: int, rows: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_T) of one pass: tiles of up to TILE_ELEMENTS positions, shaped by the mean
    sequence length, with no more rows per program than there are sequences."""
    mean_length = max(1, n // max(rows, 1))
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(mean_length)))
    return max(1, min(TILE_ELEMENTS // block_t, triton.next_power_of_2(max(rows, 1)))), block_t


def _plan(n: int, rows: int) -> tuple[int, int, bool]:
    """(BLOCK_S, BLOCK_T, chunked). One pass when it gives MIN_PROGRAMS programs, or the sequences are
    too short (mean under 2 MIN_CHUNK) or too many to chunk; otherwise chunks of BLOCK_T (a power of two
    in [MIN_CHUNK, MAX_BLOCK_T]) near mean / (MIN_PROGRAMS / rows), so the chunks number about
    MIN_PROGRAMS or more."""
    block_s, block_t = _blocks(n, rows)
    per_row = triton.cdiv(MIN_PROGRAMS, rows)
    mean = n // rows
    if (triton.cdiv(rows, block_s) >= MIN_PROGRAMS or per_row < 2 or mean < 2 * MIN_CHUNK
            or rows + 1 > MAX_CHUNKED_ROWS):
        return block_s, block_t, False
    target = max(MIN_CHUNK, mean // per_row)
    return 1, min(MAX_BLOCK_T, 1 << (target.bit_length() - 1)), True


def programs(n: int, rows: int) -> int:
    """Programs per launch of the scan (chunked: the grid, of which at most ``rows`` find no chunk)."""
    block_s, block_t, chunked = _plan(n, rows)
    return n // block_t + rows if chunked else triton.cdiv(rows, block_s)


def _optional(t, like):
    # Triton needs a pointer for every argument; a HAS_* constexpr keeps the kernel from reading it.
    return like if t is None else t


def _launch(summary_kernel, scan_kernel, data, mask, dones, offsets, gamma, lam, returns_lam, zero_masked, outputs,
            bootstrap_value, reverse):
    """Runs a scan in the layout ``_plan`` picks: ``data`` its two float inputs, ``reverse`` the forward
    recurrence (from each sequence's end; its scan kernel also reads ``bootstrap_value``).

    One pass: a program per BLOCK_S sequences (``data[0]`` stands in for the carries it does not read).
    Chunked: a program per chunk (at most n // BLOCK_T + rows); ``summary_kernel`` writes the chunk maps,
    ``gae_carries_kernel`` scans them per sequence into the state entering each chunk ([4, grid], fp32,
    fp64 for fp64), from which ``scan_kernel`` rescans its chunk."""
    like = data[0]
    rows, n = offsets.numel() - 1, like.numel()
    block_s, block_t, chunked = _plan(n, rows)
    inputs = (*data, _optional(mask, like), _optional(dones, like))
    coefficients = (offsets, gamma, lam, _optional(returns_lam, lam))
    flags = dict(HAS_MASK=mask is not None, HAS_DONES=dones is not None, ZERO_MASKED=zero_masked)
    grid, carries, rows_block = programs(n, rows), like, 1
    if chunked:
        rows_block = triton.next_power_of_2(rows + 1)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        summary, carries = (like.new_empty((k, grid), dtype=dtype) for k in (10, 4))
        summary_kernel[(grid,)](*inputs, *coefficients, summary, rows, n, grid, **flags, ROWS=rows_block,
                                BLOCK_T=block_t, num_warps=NUM_WARPS)
        gae_carries_kernel[(rows,)](summary, carries, _optional(bootstrap_value, summary), offsets, rows, n, grid,
                                    HAS_BOOT=bootstrap_value is not None, REVERSE=reverse, ROWS=rows_block,
                                    CHUNK=block_t, BLOCK_C=min(CARRY_BLOCK, triton.next_power_of_2(n // block_t + 1)),
                                    num_warps=4)
    # The forward's scan kernel also reads the bootstrap values, right after its inputs.
    boot, has_boot = ((), {})
    if reverse:
        boot, has_boot = (_optional(bootstrap_value, like),), {"HAS_BOOT": bootstrap_value is not None}
    scan_kernel[(grid,)](*inputs, *boot, *coefficients, carries, *outputs, rows, n, carries.shape[-1], **flags,
                         **has_boot, CHUNKED=chunked, ROWS=rows_block, BLOCK_S=block_s, BLOCK_T=block_t,
                         num_warps=NUM_WARPS)


def gae_forward(rewards, values, mask, dones, bootstrap_value, offsets, gamma, lam, returns_lam, zero_masked,
                advantages, returns):
    """Launches the forward scan; arguments as ``torch.ops.fastrlhf.gae_forward`` (flat, checked)."""
    _launch(gae_forward_summary_kernel, gae_forward_kernel, (rewards, values), mask, dones, offsets, gamma, lam,
            returns_lam, zero_masked, (advantages, returns), bootstrap_value, reverse=True)


def gae_backward(grad_advantages, grad_returns, mask, dones, offsets, gamma, lam, returns_lam, zero_masked,
                 grad_rewards, grad_values, grad_bootstrap):
    """Launches the backward scan; arguments as ``torch.ops.fastrlhf.gae_backward``."""
    _launch(gae_backward_summary_kernel, gae_backward_kernel, (grad_advantages, grad_returns), mask, dones, offsets,
            gamma, lam, returns_lam, zero_masked, (grad_rewards, grad_values, grad_bootstrap), None, reverse=False)


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: ``fastrlhf.gae`` forward and backward on CPU tensors
    like verl's batches (a response mask) and like truncated multi-episode rollouts (dones and a bootstrap
    value), fp32 and bf16, in both layouts: one pass (many short rows, several per program; many long rows)
    and chunked (B=256 T=512 in chunks of 256; B=64 T=8192 in chunks of 1024), so the compiled variants
    are those these launch."""
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

    shapes = ((1024, 256, False), (256, 512, False), (512, 4096, True), (64, 8192, True))
    return [(f"gae B={B} T={T} {str(dtype).removeprefix('torch.')}{' dones+bootstrap' if rollout else ''}",
             launch(B, T, dtype, rollout))
            for dtype in (torch.float32, torch.bfloat16) for B, T, rollout in shapes]
