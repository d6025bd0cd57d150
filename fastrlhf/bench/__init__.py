"""``fastrlhf bench`` and ``fastrlhf verify``: each op's cases and checks, and the runners that measure them."""

OPS = ("gae", "logprobs", "pairwise", "linear_logprobs", "group_advantages", "policy_loss")
