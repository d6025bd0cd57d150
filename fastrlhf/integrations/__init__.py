"""Drop-in integrations: ``fastrlhf.integrations.<package>.patch()`` swaps the functions of an installed
trainer package whose semantics fastrlhf's ops reproduce, and returns a handle that puts them back.

Submodules (each imports its package only when used): ``verl``, ``trl``, ``openrlhf``, ``liger``
(``FusedLinearGRPOLoss``, a drop-in for Liger's fused linear GRPO loss, which its ``patch()`` puts in place),
and ``transformers`` (``causal_lm_logprobs``: per-token log-probs of a causal LM without its logits).
"""
