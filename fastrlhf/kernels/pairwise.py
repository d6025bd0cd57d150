"""Triton kernels of the pairwise losses (``fastrlhf/ops/pairwise.py``; the C++ kernels in
``csrc/pairwise.cpp`` compute the same).

``pairs_kernel`` is the one place where pairs become losses: each program takes ``PAIR_BLOCK`` pairs,
computes each pair's loss and slope with ``_pair_terms`` (stable forms, fp32 or fp64), stores the per-pair
gradient factors and writes its block's sums of the loss and the statistics; ``finish_kernel`` (one
program) adds the blocks' sums in a fixed order, so the result is deterministic without float atomics. The reward model first runs
``pool_kernel`` (one pass over the ``[B, T]`` masks, parallel over rows: each row's last unmasked position,
the value there and the LM term's partial sums), then ``pairs_kernel`` on the pooled ``[B]`` rewards, so
the cross-row sums need no atomics and are deterministic. ``scatter_kernel`` is the reward model's backward.
Scalar coefficients arrive as fp32 kernel arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Codes shared with fastrlhf/ops/pairwise.py (LOSS_TYPES, REDUCTIONS, STATS); constexpr, so kernels can read them.
SIGMOID, IPO, HINGE, ROBUST = (tl.constexpr(code) for code in range(4))
NONE, MEAN = tl.constexpr(0), tl.constexpr(1)
LM_TOKENS = tl.constexpr(5)
# Pairs per program of pairs_kernel; finish_kernel sums the programs' partial sums BLOCK rows at a time.
PAIR_BLOCK = 256
FINISH_BLOCK = 64
# Partial sums per program: loss, correct, ties, chosen, rejected, LM log-prob sum, LM tokens.
NUM_PARTIALS, NUM_PARTIALS_POW2 = tl.constexpr(7), tl.constexpr(8)
TILE_ELEMENTS = 2048


@triton.jit
def _log1p(z):
    # log(1 + z) accurate for tiny z (Goldberg): the rounding of 1 + z is divided out again.
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _pair_terms(h, beta, eps, LOSS_TYPE: tl.constexpr):
    """Each pair's loss and its slope d loss / d h (see ``pair_terms`` in csrc/pairwise.cpp)."""
    x = beta * h
    if LOSS_TYPE == IPO:
        e = h - 1.0 / (2.0 * beta)
        loss, slope = e * e, 2.0 * e
    elif LOSS_TYPE == HINGE:
        loss, slope = tl.maximum(1.0 - x, 0.0), tl.where(x < 1.0, -beta, 0.0)
    elif LOSS_TYPE == ROBUST:
        denom = 1.0 - 2.0 * eps
        loss = ((1.0 - eps) * _softplus(-x) - eps * _softplus(x)) / denom
        slope = -beta * ((1.0 - eps) * _sigmoid(-x) + eps * _sigmoid(x)) / denom
    else:
        loss, slope = (1.0 - eps) * _softplus(-x) + eps * _softplus(x), beta * (eps - _sigmoid(-x))
    return loss, slope


@triton.jit
def pairs_kernel(u_ptr, v_ptr, ref_u_ptr, ref_v_ptr, margin_ptr, lm_ptr, loss_ptr, partial_ptr, factors_ptr, n,
                 beta, eps, rank, center, scale, LOSS_TYPE: tl.constexpr, REDUCTION: tl.constexpr,
                 HAS_REF: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_LM: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Pairs ``[program_id * BLOCK, + BLOCK)``: per-pair losses (``REDUCTION == NONE``) and gradient factors,
    and this block's NUM_PARTIALS sums at ``partial_ptr + program_id * NUM_PARTIALS`` for ``finish_kernel``.

    Bytes moved (the floor): the inputs read once (2 to 5 values per pair), 2 fp32 factors per pair written
    (plus the loss per pair without reduction) and NUM_PARTIALS sums per program."""
    ACC: tl.constexpr = tl.float64 if u_ptr.dtype.element_ty == tl.float64 else tl.float32
    w = tl.full([], 1.0, ACC)
    if REDUCTION == MEAN:
        w = w / n
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    u = tl.load(u_ptr + i, mask=live, other=0.0).to(ACC)
    v = tl.load(v_ptr + i, mask=live, other=0.0).to(ACC)
    if HAS_REF:
        u -= tl.load(ref_u_ptr + i, mask=live, other=0.0).to(ACC)
        v -= tl.load(ref_v_ptr + i, mask=live, other=0.0).to(ACC)
    h = u - v
    if HAS_MARGIN:
        h -= tl.load(margin_ptr + i, mask=live, other=0.0).to(ACC)
    loss, slope = _pair_terms(h, beta, eps, LOSS_TYPE)
    loss = rank * loss
    shared = tl.zeros([BLOCK], ACC)
    if HAS_CENTER:
        loss += center * (u + v) * (u + v)
        shared = 2.0 * center * (u + v)
    if REDUCTION == NONE:
        tl.store(loss_ptr + i, loss, mask=live)
    tl.store(factors_ptr + i, w * (rank * slope + shared), mask=live)
    tl.store(factors_ptr + n + i, w * (shared - rank * slope), mask=live)
    chosen, rejected = scale * u, scale * v
    partial = partial_ptr + tl.program_id(0) * NUM_PARTIALS
    tl.store(partial + 0, tl.sum(tl.where(live, loss, 0.0), 0))
    tl.store(partial + 1, tl.sum(tl.where(live & (chosen > rejected), 1.0, tl.where(live & (chosen == rejected),
                                                                                      0.5, 0.0)), 0))
    tl.store(partial + 2, tl.sum(tl.where(live & (chosen == rejected), 1.0, 0.0), 0))
    tl.store(partial + 3, tl.sum(tl.where(live, chosen, 0.0), 0))
    tl.store(partial + 4, tl.sum(tl.where(live, rejected, 0.0), 0))
    if HAS_LM:
        tl.store(partial + 5, tl.sum(tl.load(lm_ptr + i, mask=live, other=0.0).to(ACC), 0))
        tl.store(partial + 6, tl.sum(tl.load(lm_ptr + n + i, mask=live, other=0.0).to(ACC), 0))
    else:
        tl.store(partial + 5, tl.zeros([], ACC))
        tl.store(partial + 6, tl.zeros([], ACC))


@triton.jit
def finish_kernel(partial_ptr, loss_ptr, stats_ptr, programs, n, lm_coef, REDUCTION: tl.constexpr,
                  HAS_LM: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the sums of ``pairs_kernel``'s ``[programs, NUM_PARTIALS]`` partial sums, always in the
    same order (no atomics: deterministic), into the reduced loss and the statistics. Bytes moved: the
    partial sums once."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    k = tl.arange(0, NUM_PARTIALS_POW2)
    sums = tl.zeros([BLOCK, NUM_PARTIALS_POW2], ACC)
    for first in range(0, programs, BLOCK):
        row = first + tl.arange(0, BLOCK)
        sums += tl.load(partial_ptr + row[:, None] * NUM_PARTIALS + k[None, :],
                        mask=(row[:, None] < programs) & (k[None, :] < NUM_PARTIALS), other=0.0)
    total = tl.sum(sums, 0)
    w = tl.full([], 1.0, ACC)
    if REDUCTION == MEAN:
        w = w / n
    if REDUCTION != NONE:
        loss_total = _entry(total, k, 0) * w
        if HAS_LM:
            loss_total -= lm_coef * _entry(total, k, 5) / _entry(total, k, 6)
        tl.store(loss_ptr, loss_total)
    chosen_sum, rejected_sum = _entry(total, k, 3), _entry(total, k, 4)
    tl.store(stats_ptr + 0, _entry(total, k, 1) / n)
    tl.store(stats_ptr + 1, _entry(total, k, 2) / n)
    tl.store(stats_ptr + 2, chosen_sum / n)
    tl.store(stats_ptr + 3, rejected_sum / n)
    tl.store(stats_ptr + 4, (chosen_sum - rejected_sum) / n)
    tl.store(stats_ptr + LM_TOKENS, _entry(total, k, 6))


@triton.jit
def _entry(x, k, j: tl.constexpr):
    """Entry ``j`` of the vector ``x`` indexed by ``k``."""
    return tl.sum(tl.where(k == j, x, 0.0), 0)
@triton.jit
def _pool_side(values_ptr, mask_ptr, logprobs_ptr, index_ptr, pooled_ptr, lm_ptr, rows, length,
               HAS_LM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if values_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = row < rows
    base = row.to(tl.int64) * length
    last = tl.full([BLOCK_B], -1, tl.int32)
    lm_sum = tl.zeros([BLOCK_B], ACC)
    lm_tokens = tl.zeros([BLOCK_B], ACC)
    for start in range(0, length, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        offsets = base[:, None] + pos[None, :]
        keep = tl.load(mask_ptr + offsets, mask=live[:, None] & (pos[None, :] < length), other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(keep, pos[None, :], -1), axis=1))
        if HAS_LM:
            # A masked load: -inf or garbage at padding is never read.
            lm_sum += tl.sum(tl.load(logprobs_ptr + offsets, mask=keep, other=0.0).to(ACC), axis=1)
            lm_tokens += tl.sum(keep.to(ACC), axis=1)
    found = live & (last >= 0)
    pooled = tl.load(values_ptr + base + tl.maximum(last, 0), mask=found, other=float("nan")).to(ACC)
    tl.store(index_ptr + row, last.to(tl.int64), mask=live)
    tl.store(pooled_ptr + row, pooled, mask=live)
    if HAS_LM:
        tl.store(lm_ptr + row, lm_sum, mask=live)
        tl.store(lm_ptr + rows + row, lm_tokens, mask=live)


@triton.jit
def pool_kernel(chosen_ptr, rejected_ptr, chosen_mask_ptr, rejected_mask_ptr, logprobs_ptr, index_ptr, pooled_ptr,
                lm_ptr, rows, chosen_length, rejected_length, HAS_LM: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Per row of both sides: the last unmasked position (-1: none), the value there (NaN: none) and,
    for the chosen side with ``HAS_LM``, the sum and count of the log-probs under the mask."""
    _pool_side(chosen_ptr, chosen_mask_ptr, logprobs_ptr, index_ptr, pooled_ptr, lm_ptr, rows, chosen_length,
               HAS_LM, BLOCK_B, BLOCK_T)
    _pool_side(rejected_ptr, rejected_mask_ptr, logprobs_ptr, index_ptr + rows, pooled_ptr + rows, lm_ptr, rows,
               rejected_length, False, BLOCK_B, BLOCK_T)


@triton.jit
def _scatter_side(grad_ptr, index_ptr, factors_ptr, g, rows, length, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = row < rows
    index = tl.load(index_ptr + row, mask=live, other=-1)
    value = g * tl.load(factors_ptr + row, mask=live, other=0.0)
    grad = tl.where(pos[None, :] == index[:, None], value[:, None], 0.0)
    tl.store(grad_ptr + row.to(tl.int64)[:, None] * length + pos[None, :], grad.to(grad_ptr.dtype.element_ty),
             mask=live[:, None] & (pos[None, :] < length))


@triton.jit
def scatter_kernel(grad_loss_ptr, factors_ptr, index_ptr, stats_ptr, chosen_mask_ptr, grad_chosen_ptr,
                   grad_rejected_ptr, grad_logprobs_ptr, rows, chosen_length, rejected_length, lm_coef,
                   HAS_LM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile (program_id(0), program_id(1)) of the gradients of both values and of the chosen log-probs."""
    g = tl.load(grad_loss_ptr)
    _scatter_side(grad_chosen_ptr, index_ptr, factors_ptr, g, rows, chosen_length, BLOCK_B, BLOCK_T)
    _scatter_side(grad_rejected_ptr, index_ptr + rows, factors_ptr + rows, g, rows, rejected_length, BLOCK_B,
                  BLOCK_T)
    if HAS_LM:
        row = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = (row < rows)[:, None] & (pos[None, :] < chosen_length)
        offsets = row.to(tl.int64)[:, None] * chosen_length + pos[None, :]
        keep = tl.load(chosen_mask_ptr + offsets, mask=inside, other=0) != 0
        weight = -lm_coef * g / tl.load(stats_ptr + LM_TOKENS)
        tl.store(grad_logprobs_ptr + offsets, tl.where(keep, weight, 0.0).to(grad_logprobs_ptr.dtype.element_ty),
                 mask=inside)


def _blocks(rows: int, length: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_T): tiles of up to TILE_ELEMENTS positions, no more rows than there are."""
    block_t = min(1024, max(16, triton.next_power_of_2(length)))
    return max(1, min(TILE_ELEMENTS // block_t, triton.next_power_of_2(rows))), block_t


def _pairs(u, v, ref_u, ref_v, margin, lm, loss, stats, factors, beta, eps, rank, center, scale, lm_coef, loss_type,
           reduction):
    n = u.numel()
    programs = triton.cdiv(n, PAIR_BLOCK)
    partial = torch.empty(programs, NUM_PARTIALS.value, dtype=factors.dtype, device=factors.device)
    pairs_kernel[(programs,)](u, v, u if ref_u is None else ref_u, v if ref_v is None else ref_v,
                              u if margin is None else margin, u if lm is None else lm, loss, partial, factors, n,
                              beta, eps, rank, center, scale, LOSS_TYPE=loss_type, REDUCTION=reduction,
                              HAS_REF=ref_u is not None, HAS_MARGIN=margin is not None, HAS_CENTER=center != 0,
                              HAS_LM=lm is not None, BLOCK=PAIR_BLOCK)
    finish_kernel[(1,)](partial, loss, stats, programs, n, lm_coef, REDUCTION=reduction, HAS_LM=lm is not None,
                        BLOCK=FINISH_BLOCK)


def pairwise_forward(chosen, rejected, ref_chosen, ref_rejected, margin, beta, label_smoothing, loss_type, reduction,
                     reward_scale, loss, stats, factors):
    """Launches ``pairs_kernel``; arguments as ``torch.ops.fastrlhf_cpp.pairwise_forward``."""
    _pairs(chosen, rejected, ref_chosen, ref_rejected, margin, None, loss, stats, factors, beta, label_smoothing, 1.0,
           0.0, reward_scale, 0.0, loss_type, reduction)


def reward_model_forward(chosen_values, rejected_values, chosen_mask, rejected_mask, margin, chosen_logprobs,
                         rank_coef, center_coef, lm_coef, loss, stats, factors, index):
    """Launches ``pool_kernel`` then ``pairs_kernel``; arguments as ``torch.ops.fastrlhf_cpp.reward_model_forward``."""
    rows = chosen_values.shape[0]
    pooled = torch.empty(2, rows, dtype=factors.dtype, device=factors.device)
    lm = None if chosen_logprobs is None else torch.empty_like(pooled)
    block_b, block_t = _blocks(rows, max(chosen_values.shape[1], rejected_values.shape[1]))
    pool_kernel[(triton.cdiv(rows, block_b),)](
        chosen_values, rejected_values, chosen_mask, rejected_mask,
        chosen_values if chosen_logprobs is None else chosen_logprobs, index, pooled, pooled if lm is None else lm,
        rows, chosen_values.shape[1], rejected_values.shape[1], HAS_LM=lm is not None, BLOCK_B=block_b,
        BLOCK_T=block_t)
    _pairs(pooled[0], pooled[1], None, None, margin, lm, loss, stats, factors, 1.0, 0.0, rank_coef, center_coef, 1.0,
           lm_coef, SIGMOID.value, MEAN.value)


def reward_model_backward(grad_loss, factors, index, stats, chosen_mask, lm_coef, has_lm, grad_chosen,
                          grad_rejected, grad_logprobs):
    """Launches ``scatter_kernel``; arguments as ``torch.ops.fastrlhf_cpp.reward_model_backward``."""
    rows, length = grad_chosen.shape[0], max(grad_chosen.shape[1], grad_rejected.shape[1])
    block_b, block_t = _blocks(rows, length)
    scatter_kernel[(triton.cdiv(rows, block_b), triton.cdiv(length, block_t))](
        grad_loss, factors, index, stats, chosen_mask, grad_chosen, grad_rejected,
        grad_logprobs if has_lm else grad_chosen, rows, grad_chosen.shape[1], grad_rejected.shape[1], lm_coef,
        HAS_LM=has_lm, BLOCK_B=block_b, BLOCK_T=block_t)


def aot_cases():
    """(label, launch) pairs for ``fastrlhf.kernels.compile``: forward and backward of each pairwise loss as
    trainers call it (DPO's four loss types with reference log-probs, the margin form, and the reward model
    with its LM term), fp32 and bf16, so the compiled variants are those these launch."""
    import fastrlhf

    def leaves(count, shape, dtype):
        return [torch.randn(shape).to(dtype).requires_grad_() for _ in range(count)]

    def dpo(loss_type, dtype):
        def run():
            logps = leaves(4, 64, dtype)
            loss, _ = fastrlhf.dpo_loss(*logps, beta=0.1, loss_type=loss_type)
            torch.autograd.grad(loss, logps[:2])
        return run

    def pairwise(dtype):
        def run():
            chosen, rejected, margin = leaves(3, 64, dtype)
            loss = fastrlhf.pairwise_sigmoid_loss(chosen, rejected, margin=margin, label_smoothing=0.1)
            torch.autograd.grad(loss, (chosen, rejected, margin))
        return run

    def reward_model(dtype, lm):
        def run():
            chosen, rejected = leaves(2, (8, 300), dtype)
            mask = torch.ones(8, 300, dtype=torch.bool)
            logprobs = leaves(1, (8, 300), torch.float32)[0] if lm else None
            loss, _ = fastrlhf.reward_model_loss(chosen, rejected, chosen_mask=mask, rejected_mask=mask,
                                                 center_coef=0.01 if lm else 0.0, chosen_logprobs=logprobs,
                                                 lm_coef=0.5 if lm else 0.0)
            torch.autograd.grad(loss, (chosen, rejected, *([logprobs] if lm else [])))
        return run

    # bf16 for every loss; fp32 for the plain DPO and reward-model calls.
    cases = [(f"dpo_loss B=64 {loss_type} bfloat16", dpo(loss_type, torch.bfloat16))
             for loss_type in ("sigmoid", "ipo", "hinge", "robust")]
    cases += [("pairwise_sigmoid_loss B=64 margin bfloat16", pairwise(torch.bfloat16)),
              ("reward_model_loss B=8 T=300 bfloat16 center+lm", reward_model(torch.bfloat16, True)),
              ("dpo_loss B=64 sigmoid float32", dpo("sigmoid", torch.float32)),
              ("reward_model_loss B=8 T=300 float32", reward_model(torch.float32, False))]
    return cases
