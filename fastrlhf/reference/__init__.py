"""Plain-torch reference implementations, with the same signatures as the fused ops."""

from fastrlhf.reference.gae import gae, masked_whiten

__all__ = ["gae", "masked_whiten"]
