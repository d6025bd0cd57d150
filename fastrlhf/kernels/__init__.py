"""Triton kernels, one module per op. Imported only through ``fastrlhf.backend.triton_kernels``."""

NAMES = ("gae", "logprobs", "pairwise", "policy_loss", "group_advantages", "sampling_threshold",
         "rollout_correction")
