"""Training loop, checkpoints, metrics."""
