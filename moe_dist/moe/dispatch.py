"""Dispatch (tokens -> rows grouped by expert) and combine (rows -> tokens), one process.

Legend: T tokens, D model dim, E experts, K top-k, N kept assignments (routed rows).

The MoE layer only talks to a dispatcher, so the expert-parallel dispatcher (an all-to-all
between ranks) slots in without touching the layer. Plan of the local one:
  1. keep the assignments that fit their expert's capacity (token-major order),
  2. stable-sort them by expert -> rows of each expert are contiguous, in token order,
  3. gather the token rows (the only copy of the activations),
  and to combine: scale each row by its routing weight and scatter-add into its token.
No [T, E, capacity] one-hot tensors (DeepSpeed-MoE's einsum dispatch) anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DispatchState:
    token_N: torch.Tensor
    """Source token of each routed row."""
    assignment_N: torch.Tensor
    """Index into the flattened [T, K] assignments of each routed row."""
    num_tokens: int


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


class LocalDispatcher:
    """All experts live in this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(
        self, x_TD: torch.Tensor, expert_TK: torch.Tensor, keep_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        K = expert_TK.shape[1]
        assignment_N, tokens_per_expert_E = sort_by_expert(expert_TK.reshape(-1), keep_TK.reshape(-1), self.num_experts)
        token_N = torch.div(assignment_N, K, rounding_mode="floor")
        return x_TD[token_N], tokens_per_expert_E, DispatchState(token_N, assignment_N, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, weight_TK: Optional[torch.Tensor], state: DispatchState) -> torch.Tensor:
        """Scatter-add rows into their tokens, scaled by their routing weight (None: unscaled,
        for layers that weight the expert input instead, like SliceMoE)."""
        if weight_TK is not None:
            y_ND = y_ND * row_weights(weight_TK, state).to(y_ND.dtype).unsqueeze(1)
        out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, state.token_N, y_ND)


def row_weights(weight_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """The routing weight of each dispatched row, [N]."""
    return weight_TK.reshape(-1)[state.assignment_N]
