"""Sampling responses from a causal LM (anything with ``model(ids) -> hidden`` and ``output_weight``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompts: torch.Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None):
    """Samples a response for each prompt.

    Args:
        prompts: ``[B, P]`` int64 token ids, all of the same length P (no padding inside the prompt).
        temperature, top_k: sampling from ``softmax(logits / temperature)``, restricted to the ``top_k``
            largest logits when given; ``temperature=0`` is not allowed (PPO's log-probs divide by it).
        generator: the source of randomness (so a run can be resumed exactly).

    Returns:
        ``responses`` ``[B, max_new_tokens]`` int64, right-padded with ``pad_id`` after the first
        ``eos_id``; ``mask`` ``[B, max_new_tokens]`` bool, true at the response tokens including the EOS.
        A response that never emits EOS fills all ``max_new_tokens`` positions.
    """
    if eos_id == pad_id:
        raise ValueError(f"eos_id and pad_id: expected distinct tokens, got {eos_id} for both")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive float, got {temperature}")
    B = prompts.shape[0]
    weight = model.output_weight
    ids = prompts
    finished = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    for _ in range(max_new_tokens):
        logits = (model(ids)[:, -1] @ weight.T).float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        token = torch.where(finished, pad_id, token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    responses = ids[:, prompts.shape[1]:]
    responses = torch.cat([responses, responses.new_full((B, max_new_tokens - responses.shape[1]), pad_id)], dim=1)
    return responses, response_mask(responses, eos_id)


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[B, R]`` bool: true up to and including each row's first ``eos_id`` (everywhere if none)."""
    is_eos = (responses == eos_id).int()
    return (is_eos.cumsum(1) - is_eos) == 0
