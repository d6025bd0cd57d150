"""Per-token log-probs of a Hugging Face causal LM, from its hidden states, without its logits."""

from __future__ import annotations

from torch import Tensor

from fastrlhf import checks

IGNORE_INDEX = -100  # Hugging Face's label for "not scored"
# Config fields of models whose logits are not just ``lm_head(hidden)``; linear_logprobs has no such step.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")


def causal_lm_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, *,
                       temperature: float = 1.0, return_entropy: bool = False):
    """Log-probability of each next token under a causal LM (``transformers.PreTrainedModel``).

    Runs the model's backbone (``model.base_model``) for the last hidden states and projects them through
    ``model.get_output_embeddings()`` (weight and bias) with ``fastrlhf.linear_logprobs``, so the
    ``[B, T, V]`` logits are never built, in the forward or the backward.

    Args:
        input_ids: ``[B, T]`` token ids fed to the model.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (left or right), or None.
        labels: ``[B, T]`` the tokens to score, aligned with ``input_ids`` (usually ``input_ids`` itself),
            ``-100`` where not to score (e.g. the prompt), as in Hugging Face's causal-LM loss.
        temperature: the logits are divided by it (the sampler's temperature).
        return_entropy: also return the entropy of each next-token distribution.

    Returns:
        ``[B, T - 1]`` fp32 ``logp``, or ``(logp, entropy)``: entry ``t`` is
        ``log p(labels[:, t + 1] | input_ids[:, :t + 1])``, computed from position ``t`` (the shift is
        done here, as in Hugging Face's loss). A target is scored when ``labels[:, t + 1] != -100`` and
        ``attention_mask[:, t + 1] == 1``; elsewhere ``logp`` and ``entropy`` are 0 with no gradient.
        Differentiable with respect to the model's parameters.
    """
    from fastrlhf import linear_logprobs

    checks.dtype("input_ids", input_ids, checks.INTS)
    checks.ndim("input_ids", input_ids, (2,))
    checks.dtype("labels", labels, checks.INTS)
    checks.shape("labels", labels, input_ids.shape)
    if attention_mask is not None:
        checks.shape("attention_mask", attention_mask, input_ids.shape)
    text_config = model.config.get_text_config()
    for field in LOGIT_TRANSFORMS:
        if getattr(text_config, field, None) not in (None, 1, 1.0):
            raise ValueError(f"model: expected logits equal to lm_head(hidden), but its config sets {field}="
                             f"{getattr(text_config, field)}, which causal_lm_logprobs does not apply")

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    if attention_mask is not None:
        scored = scored & (attention_mask[:, 1:] != 0)
    # Only the scored positions go through the head: prompts and padding cost nothing there.
    out = linear_logprobs(hidden[:, :-1][scored], head.weight, targets[scored], bias=head.bias,
                          temperature=temperature, return_entropy=return_entropy)
    out = out if return_entropy else (out,)
    full = tuple(x.new_zeros(targets.shape).masked_scatter(scored, x) for x in out)
    return full if return_entropy else full[0]
