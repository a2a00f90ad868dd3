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
    return kept_P[order], torch.bincount(expert_kept, minlength=num_experts)
