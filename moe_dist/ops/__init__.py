"""Functional ops (one concept per file): grouped matmul, activations.

Gathers of routed rows use `x.index_select(0, idx)`, never `x[idx]`. A row gathered twice
(top-k > 1, or a bias per expert) sums its gradients in the backward. For `x[idx]` that sum
is index_put with accumulate, which on CPU with more than one thread adds floats with
parallel atomics once the tensor holds 32K elements: the order, and so the rounding, changes
from run to run (measured: the tiny sigma-MoE's loss differed in the 6th digit at step 7 of
two identical runs, and 1% in validation perplexity after 600 steps). index_select's
backward is index_add, which CPU runs serially. tests/test_architectures.py checks that
gradients repeat bit for bit.
"""
