"""Functional ops (one concept per file): grouped matmul, activations."""
