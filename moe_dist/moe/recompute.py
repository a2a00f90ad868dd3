"""Activation checkpointing of whole blocks (train.activation_checkpoint=full).

A checkpointed block keeps only its input for the backward; the backward runs its forward
again to get the activations it needs. torch.utils.checkpoint does the work (non-reentrant:
it takes any output structure, so a block returns its routing auxiliaries as usual; tested
under DDP, FSDP2, ZeRO-3 and torch.compile). What a routed block needs besides
(docs/backends.md has the longer story and the measurements):

- The whole forward again, on every rank. torch's early stop ends a recompute once it has
  remade every saved tensor; that point matches across ranks only while every rank saves
  the same sequence of tensors, which nothing enforces, and a rank that stopped before an
  all-to-all its peers enter would hang them. Turning it off costs only the block's tail.
- The same routing. The input is kept exactly, expert and slice dropout hash the global
  row (moe/noise.py), torch restores the RNG state for model.dropout, and the FFN router's
  input x + attention(x) repeats bit for bit because nothing in the attention sums floats
  through indices in an order-dependent way (CUDA atomics add in another order every run;
  SwitchHead sums slots instead, ops/combine.py). A near-tie routed elsewhere in the
  recompute would give other gradients, or torch's metadata error once a shape changes. Replaying the forward's routing instead
  (NeMo-Automodel saves the router's top-k) would not need that determinism, but a replay
  list read inside a compiled block makes dynamo guard on Python state.
- Forward side effects once: the aux-loss-free balancing counts (BalanceBias.observe) skip
  the recompute (`recomputing()`). The trainer's routing statistics come from the first
  forward's outputs; the recompute's are discarded.
- The cost: about one more forward per step; at ep>1 every routed call's recompute repeats
  its two all-to-alls and the host read of their split sizes.
"""

from __future__ import annotations

import contextlib

import torch.utils.checkpoint as torch_checkpoint

_RECOMPUTING = False
"""True while a checkpointed block runs its forward again in the backward. A module global,
not a thread-local: torch.compile guards a global bool (one more graph for the recompute
where a compiled block reads it), it cannot trace a threading.local. One device per process
runs one recompute at a time; a model spread over devices, whose backward threads could
recompute at once, would need a per-thread flag."""


_RECOMPUTES = 0
"""Recomputes started in this process: the trainer reports them, so a run shows that its
blocks did run again (eager; under torch.compile the recompute is inside the graph)."""


def recomputing() -> bool:
    return _RECOMPUTING


def recompute_count() -> int:
    return _RECOMPUTES


@contextlib.contextmanager
def _recompute_context():
    global _RECOMPUTING, _RECOMPUTES
    _RECOMPUTES += 1
    previous, _RECOMPUTING = _RECOMPUTING, True
    try:
        yield
    finally:
        _RECOMPUTING = previous


def _contexts():
    return contextlib.nullcontext(), _recompute_context()


def checkpoint_block(block, *args):
    """block(*args), its activations recomputed in the backward (see the module docstring)."""
    with torch_checkpoint.set_checkpoint_early_stop(False):
        return torch_checkpoint.checkpoint(block, *args, use_reentrant=False, context_fn=_contexts)
