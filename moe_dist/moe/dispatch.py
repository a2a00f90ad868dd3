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

import torch


@dataclass
class DispatchState:
    token_N: torch.Tensor
    """Source token of each routed row."""
    assignment_N: torch.Tensor
    """Index into the flattened [T, K] assignments of each routed row."""
    num_tokens: int


class LocalDispatcher:
    """All experts live in this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(
        self, x_TD: torch.Tensor, expert_TK: torch.Tensor, keep_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        K = expert_TK.shape[1]
        # NOTE: device-to-host sync: the number of kept rows sizes the permuted buffer.
        kept_P = keep_TK.reshape(-1).nonzero().squeeze(1)
        expert_P = expert_TK.reshape(-1)[kept_P]
        order = torch.sort(expert_P, stable=True).indices
        assignment_N = kept_P[order]
        token_N = torch.div(assignment_N, K, rounding_mode="floor")
        tokens_per_expert_E = torch.bincount(expert_P, minlength=self.num_experts)
        return x_TD[token_N], tokens_per_expert_E, DispatchState(token_N, assignment_N, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, weight_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        w_N = weight_TK.reshape(-1)[state.assignment_N].to(y_ND.dtype)
        out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, state.token_N, y_ND * w_N.unsqueeze(1))
