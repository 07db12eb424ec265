"""Training: the replica step, host loop, checkpoints and gradient caching."""
