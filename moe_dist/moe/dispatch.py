"""Grouping routed assignments by expert (the local half of dispatch).

Legend: P assignments (rows x top-k, flattened row-major), N kept assignments, E experts.

Every routed layer (token-choice MoE, sigma-MoE, SliceMoE, SwitchHead's V and O) does:
  1. sort its kept assignments by expert -> the rows of each expert are contiguous, and
     within an expert they stay in assignment (token) order,
  2. hand the sorted row indices to ExpertParallel.run (local, or all-to-all across ranks),
  3. scale the outputs by the routing weights and scatter-add them into their rows.
No [T, E, capacity] one-hot tensors (DeepSpeed-MoE's einsum dispatch) anywhere.

Capacity drops: eager, and at ep > 1, the dropped assignments are left out of the sort, so
the dispatch is sized by the kept count, which the host must read (one sync). Under
torch.compile at ep=1 that sync would break the layer's graph (and rule out a CUDA graph),
so there the layer computes every assignment and zeroes the dropped ones' outputs
(computes_dropped): no shape depends on the data. The expert FLOPs are then a dropless
layer's: at a capacity factor above 1, fewer than the E x capacity padded rows that
DeepSpeed-MoE and Megatron's drop-and-pad compute. Eager keeps leaving them out: on CPU
the sync is free and the rows are not; whether the sync or the rows cost more in eager on
a GPU is not measured yet. At ep > 1 the all-to-all's split sizes sync anyway, and
sending dropped rows would cost bytes.
"""

from __future__ import annotations

from typing import Optional

import torch


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_experts] int64: how many of `ids` (all in [0, num_experts)) name each expert.

    torch.bincount(ids, minlength=E) in eager mode. Its output length is max(ids) + 1 when
    that exceeds minlength, a shape that depends on the data, so torch.compile breaks the
    graph there; under compile the same counts come from a scatter-add into [E] zeros,
    whose shape is static (tests check the two agree)."""
    flat = ids.reshape(-1)
    if torch.compiler.is_compiling():
        return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.long)
        )
    return torch.bincount(flat, minlength=num_experts)


def computes_dropped(ep_size: int) -> bool:
    """Whether a routed layer keeps its capacity-dropped assignments in the dispatch, with
    their outputs zeroed, rather than leave them out (see the module docstring)."""
    return ep_size == 1 and torch.compiler.is_compiling()


def sort_by_expert(
    expert_P: torch.Tensor, keep_P: Optional[torch.Tensor], num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment_N, tokens_per_expert_E): the kept assignment ids, stably sorted by expert
    (rows of one expert stay in assignment order), and how many each expert got."""
    if keep_P is None:
        kept_P = torch.arange(expert_P.numel(), device=expert_P.device)
    else:
        # NOTE: device-to-host sync: the number of kept rows sizes the permuted buffer.
        kept_P = keep_P.nonzero().squeeze(1)
    expert_kept = expert_P[kept_P]
    order = torch.sort(expert_kept, stable=True).indices
    return kept_P[order], expert_counts(expert_kept, num_experts)


def dispatch_order(
    expert_P: torch.Tensor, keep_P: Optional[torch.Tensor], num_experts: int, ep_size: int
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(assignment_N, rows_per_expert_E, dropped_N, kept_per_expert_E): sort_by_expert under
    the module docstring's rule for capacity drops. dropped_N is None when the dropped
    assignments were left out; under computes_dropped they are sorted in with the kept
    ones, and dropped_N marks the rows whose outputs the caller must zero."""
    if keep_P is None or not computes_dropped(ep_size):
        assignment_N, rows_E = sort_by_expert(expert_P, keep_P, num_experts)
        return assignment_N, rows_E, None, rows_E
    assignment_N, rows_E = sort_by_expert(expert_P, None, num_experts)
    kept_E = torch.zeros(num_experts, dtype=torch.long, device=expert_P.device).scatter_add_(
        0, expert_P, keep_P.long()
    )  # static shapes: no sync
    return assignment_N, rows_E, ~keep_P.index_select(0, assignment_N), kept_E
