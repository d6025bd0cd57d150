"""Drop-in integrations: ``fastrlhf.integrations.<package>.patch()`` swaps the functions of an installed
trainer package whose semantics fastrlhf's ops reproduce, and returns a handle that puts them back.

Submodules (each imports its package only when used): ``verl``, ``trl``, ``openrlhf``, and
``transformers`` (``causal_lm_logprobs``: per-token log-probs of a causal LM without its logits).
"""
