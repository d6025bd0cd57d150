"""``fastrlhf bench`` and ``fastrlhf verify``: each op's cases and checks, and the runners that measure them."""

OPS = ("gae", "logprobs", "pairwise", "linear_logprobs", "policy_loss", "linear_policy_loss", "group_advantages",
       "rollout_correction")
