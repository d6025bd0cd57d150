"""Triton kernels, one module per op. Imported only through ``fastrlhf.backend.triton_kernels``."""

NAMES = ("gae", "logprobs", "pairwise", "group_advantages", "policy_loss")
