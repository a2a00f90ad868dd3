"""Grouping routed assignments by expert (the local half of dispatch).

Legend: P assignments (rows x top-k, flattened row-major), N kept assignments, E experts.

Every routed layer (token-choice MoE, sigma-MoE, SliceMoE, SwitchHead's V and O) does:
  1. sort its kept assignments by expert -> the rows of each expert are contiguous, and
     within an expert they stay in assignment (token) order,
  2. hand the sorted row indices to ExpertParallel.run (local, or all-to-all across ranks),
  3. scale the outputs by the routing weights and scatter-add them into their rows.
No [T, E, capacity] one-hot tensors (DeepSpeed-MoE's einsum dispatch) anywhere.
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
