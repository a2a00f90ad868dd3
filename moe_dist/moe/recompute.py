"""Activation checkpointing of whole blocks (train.activation_checkpoint=full).

A checkpointed block keeps only its input for the backward; the backward runs its forward
again to get the activations it needs. torch.utils.checkpoint does the work (non-reentrant:
it takes any output structure, so a block returns its routing auxiliaries as usual, and it
works under DDP, FSDP2 and ZeRO). What moe_dist adds is what a routed block needs to be
recomputed safely:

- The whole forward runs again, on every rank. torch stops a recompute early by default,
  once it has remade every tensor the backward saved. That point is the same on every rank
  only while every rank saves the same sequence of tensors, which nothing enforces (a
  data-dependent branch in a layer or an expert backend would break it), and a rank that
  stopped before an all-to-all its peers enter would hang them. Running the whole forward
  costs only the block's tail after its last saved tensor.
- The same routing. The block's input is saved exactly; expert and slice dropout hash the
  global row (moe/noise.py); torch.utils.checkpoint restores the RNG state for model.dropout.
  The FFN router reads x + attention(x), so the attention's output must repeat bit for bit,
  on a GPU too: nothing in it adds floats through indices, whose CUDA atomics add in
  another order every run (SwitchHead combines its experts' rows by slot, then sums).
  Otherwise a near-tie could go to another expert in the recompute: silently other
  gradients, or torch's "different metadata" error once a count changes a shape (the
  failure NeMo-Automodel met under DeepEP).
- Forward side effects happen once. The only one is the aux-loss-free balancing counts
  (BalanceBias.observe), which skip the recompute (`recomputing()`). The routing statistics
  the trainer logs come from the first forward's outputs; the recompute's are discarded.
- The cost: about one more forward per step, and at ep>1 with a capacity factor one more
  host read (the all-to-all split sizes) per routed block, in the backward's recompute.
"""

from __future__ import annotations

import contextlib

import torch.utils.checkpoint as torch_checkpoint

_RECOMPUTING = False
"""True while a checkpointed block runs its forward again in the backward. A module global,
not a thread-local: torch.compile guards a global bool (one more graph for the recompute
where a compiled block reads it), it cannot trace a threading.local."""


def recomputing() -> bool:
    return _RECOMPUTING


@contextlib.contextmanager
def _recompute_context():
    global _RECOMPUTING
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
