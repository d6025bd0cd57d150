"""``fastrlhf.gae``: generalised advantage estimation as one fused reverse scan.

Registered as the custom ops ``fastrlhf::gae_forward`` / ``fastrlhf::gae_backward`` with fake
implementations and autograd, so it runs under ``torch.compile(fullgraph=True)``. CPU tensors run the
C++ kernel, CUDA tensors the Triton kernel (see ``fastrlhf.backend``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrlhf import backend, checks, reference

MASK_MODES = ("skip", "zero")


def gae(rewards: Tensor, values: Tensor, mask: Optional[Tensor] = None, *, gamma: float | Tensor = 1.0,
        lam: float | Tensor = 1.0, dones: Optional[Tensor] = None, bootstrap_value: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None, mask_mode: str = "skip",
        returns_lam: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Advantages and returns of a batch of sequences, right to left in one pass.

    Args:
        rewards, values: ``[B, T]`` float (fp32, fp64, bf16, fp16), or packed ``[N]`` with ``cu_seqlens``.
        mask: like ``rewards``, bool or 0/1. In ``mask_mode="skip"`` a masked token is transparent: the
            next value and the advantage carry over it unchanged, its advantage is the carried one, and
            its reward and value are never read into the result (garbage, inf or NaN there is harmless).
            This is verl's ``compute_gae_advantage_return`` before whitening. ``mask_mode="zero"`` is
            OpenRLHF's convention: rewards and values are zeroed where masked (selected, not multiplied,
            so NaN there does not leak) and every token is a step.
        gamma, lam: floats or ``[S]`` tensors (one per sequence), in [0, 1].
        dones: like ``rewards``, bool: the episode ends after step t, so nothing flows from t + 1 into t
            (several episodes can share one row).
        bootstrap_value: ``[S]``, the value after each sequence's last step (truncated rollouts); else 0.
        cu_seqlens: int32/int64 ``[S + 1]`` offsets of S packed sequences in ``rewards`` (from 0 to N).
        returns_lam: when given, ``returns = A(returns_lam) + V`` while advantages use ``lam``.

    Values (offsets increasing from 0 to N, coefficients in [0, 1]) are checked, raising ValueError,
    where ``fastrlhf.checks.values_checked`` allows it: on CPU, and on CUDA with ``FASTRLHF_CHECKS=1``.
    The default CUDA path never syncs with the host; there the kernel poisons instead: invalid
    ``cu_seqlens`` make every output NaN (it never reads or writes outside the N elements), and a
    sequence whose gamma, lam or returns_lam lies outside [0, 1] gets NaN outputs and gradients.

    With S = B for padded input: recurrence ``delta_t = r_t + gamma V_next - V_t``,
    ``A_t = delta_t + gamma lam A_next``, ``returns_t = A_t + V_t``. Arithmetic is fp32 (fp64 for fp64
    inputs); outputs have the input dtype. A NaN or inf at an unmasked token spreads along its own
    sequence (towards the start) only. Differentiable with respect to rewards, values and
    bootstrap_value.
    """
    if backend.forced_backend() == "reference":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam, dones=dones,
                             bootstrap_value=bootstrap_value, cu_seqlens=cu_seqlens, mask_mode=mask_mode,
                             returns_lam=returns_lam)
    args = _canonical(rewards, values, mask, gamma, lam, dones, bootstrap_value, cu_seqlens, mask_mode,
                      returns_lam)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rewards, values, bootstrap_value))
    # The registered op costs ~20 us of dispatch per call on CPU, more than the kernel at small shapes;
    # eager calls that need no gradient (GAE usually runs under no_grad) go straight to the kernel.
    if differentiable or torch.compiler.is_compiling():
        advantages, returns = torch.ops.fastrlhf.gae_forward(*args)
    else:
        advantages, returns = _forward(*args)
    return advantages.view_as(rewards), returns.view_as(rewards)


def _canonical(rewards, values, mask, gamma, lam, dones, bootstrap_value, cu_seqlens, mask_mode, returns_lam):
    """Checks the arguments and brings them to the kernels' form: flat tensors plus sequence offsets."""
    checks.dtype("rewards", rewards, checks.FLOATS)
    checks.dtype("values", values, (rewards.dtype,))
    checks.shape("values", values, rewards.shape)
    checks.device("values", values, rewards.device)
    checks.one_of("mask_mode", mask_mode, MASK_MODES)
    if cu_seqlens is None:
        checks.ndim("rewards", rewards, (2,))
        rows, length = rewards.shape
        offsets = torch.arange(0, (rows + 1) * length, length, device=rewards.device)[: rows + 1]
    else:
        checks.ndim("rewards (packed, with cu_seqlens)", rewards, (1,))
        offsets = checks.offsets(cu_seqlens, rewards)
        rows = offsets.numel() - 1
    compute = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    flat_mask = _flag("mask", mask, rewards)
    flat_dones = _flag("dones", dones, rewards)
    if bootstrap_value is not None:
        checks.dtype("bootstrap_value", bootstrap_value, checks.FLOATS)
        checks.shape("bootstrap_value", bootstrap_value, (rows,))
        checks.device("bootstrap_value", bootstrap_value, rewards.device)
        bootstrap_value = bootstrap_value.to(rewards.dtype).contiguous()
    return (rewards.contiguous().view(-1), values.contiguous().view(-1), flat_mask, flat_dones,
            bootstrap_value, offsets, _coefficient("gamma", gamma, rows, compute, rewards.device),
            _coefficient("lam", lam, rows, compute, rewards.device),
            None if returns_lam is None else _coefficient("returns_lam", returns_lam, rows, compute, rewards.device),
            mask_mode == "zero")


def _flag(name, value, like):
    if value is None:
        return None
    checks.tensor(name, value)
    checks.shape(name, value, like.shape)
    checks.device(name, value, like.device)
    if value.is_complex():
        raise TypeError(f"{name}: expected bool or 0/1 numbers, got {value.dtype}")
    return (value if value.dtype == torch.bool else value != 0).contiguous().view(-1)


def _coefficient(name, value, rows, dtype, device):
    checks.unit_interval(name, value)
    if isinstance(value, Tensor):
        checks.shape(name, value, (rows,))
        checks.device(name, value, device)
        return value.detach().to(dtype).contiguous()
    return torch.full((rows,), float(value), dtype=dtype, device=device)


def _forward(rewards, values, mask, dones, bootstrap_value, offsets, gamma, lam, returns_lam, zero_masked):
    advantages, returns = backend.empty_outputs(rewards, 2)
    backend.kernels("gae", rewards).gae_forward(rewards, values, mask, dones, bootstrap_value, offsets, gamma,
                                                lam, returns_lam, zero_masked, advantages, returns)
    return advantages, returns


@torch.library.custom_op("fastrlhf::gae_forward", mutates_args=())
def gae_forward(rewards: Tensor, values: Tensor, mask: Optional[Tensor], dones: Optional[Tensor],
                bootstrap_value: Optional[Tensor], offsets: Tensor, gamma: Tensor, lam: Tensor,
                returns_lam: Optional[Tensor], zero_masked: bool) -> tuple[Tensor, Tensor]:
    """Flat ``[N]`` advantages and returns."""
    return _forward(rewards, values, mask, dones, bootstrap_value, offsets, gamma, lam, returns_lam, zero_masked)


@gae_forward.register_fake
def _(rewards, values, mask, dones, bootstrap_value, offsets, gamma, lam, returns_lam, zero_masked):
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.custom_op("fastrlhf::gae_backward", mutates_args=())
def gae_backward(grad_advantages: Tensor, grad_returns: Tensor, mask: Optional[Tensor], dones: Optional[Tensor],
                 offsets: Tensor, gamma: Tensor, lam: Tensor, returns_lam: Optional[Tensor],
                 zero_masked: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for rewards, values (``[N]``) and bootstrap values (``[S]``): a forward-in-time scan.

    The recurrence is linear in rewards and values, so the backward needs only the coefficients
    (mask, dones, gamma, lam), never the forward's inputs or outputs.
    """
    grad_rewards, grad_values = backend.empty_outputs(grad_advantages, 2)
    grad_bootstrap = backend.empty_outputs(gamma.to(grad_advantages.dtype), 1)[0]
    backend.kernels("gae", grad_advantages).gae_backward(grad_advantages, grad_returns, mask, dones, offsets, gamma,
                                                         lam, returns_lam, zero_masked, grad_rewards, grad_values,
                                                         grad_bootstrap)
    return grad_rewards, grad_values, grad_bootstrap


@gae_backward.register_fake
def _(grad_advantages, grad_returns, mask, dones, offsets, gamma, lam, returns_lam, zero_masked):
    like = torch.empty_like(grad_advantages)
    return like, torch.empty_like(like), torch.empty_like(gamma, dtype=grad_advantages.dtype)


def _setup_context(ctx, inputs, output):
    _, _, mask, dones, bootstrap_value, offsets, gamma, lam, returns_lam, zero_masked = inputs
    ctx.save_for_backward(mask, dones, offsets, gamma, lam, returns_lam)
    ctx.zero_masked = zero_masked
    ctx.has_bootstrap = bootstrap_value is not None


def _backward(ctx, grad_advantages, grad_returns):
    mask, dones, offsets, gamma, lam, returns_lam = ctx.saved_tensors
    grad_r, grad_v, grad_b = torch.ops.fastrlhf.gae_backward(
        grad_advantages.contiguous(), grad_returns.contiguous(), mask, dones, offsets, gamma, lam,
        returns_lam, ctx.zero_masked)
    return grad_r, grad_v, None, None, grad_b if ctx.has_bootstrap else None, None, None, None, None, None


def _setup_backward_context(ctx, inputs, output):
    _, _, mask, dones, offsets, gamma, lam, returns_lam, zero_masked = inputs
    ctx.save_for_backward(mask, dones, offsets, gamma, lam, returns_lam)
    ctx.zero_masked = zero_masked


def _double_backward(ctx, grad_grad_rewards, grad_grad_values, grad_grad_bootstrap):
    # gae_forward is linear in (rewards, values, bootstrap) and gae_backward is its transpose, so the
    # transpose of gae_backward is gae_forward itself.
    mask, dones, offsets, gamma, lam, returns_lam = ctx.saved_tensors
    grad_adv, grad_ret = torch.ops.fastrlhf.gae_forward(
        grad_grad_rewards.contiguous(), grad_grad_values.contiguous(), mask, dones,
        grad_grad_bootstrap.contiguous(), offsets, gamma, lam, returns_lam, ctx.zero_masked)
    return grad_adv, grad_ret, None, None, None, None, None, None, None


gae_forward.register_autograd(_backward, setup_context=_setup_context)
gae_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)
