"""The fused ops: each module registers its custom ops, dispatches to a kernel and differentiates it."""
