"""Token-choice softmax top-k routing, expert capacity, and the balancing losses.

Legend: T tokens, E experts, K top-k.

All router math is float32 whatever the compute dtype (Switch Transformer's "selective
precision"): the caller passes float32 logits.

Rules that are part of the contract (tests pin them):
- Ties between equal probabilities go to the lower expert index (stable sort).
- Weights: top-1 uses p_i itself (Switch: y = p_i E_i(x)); top-k >= 2 renormalises the k
  selected probabilities to sum 1 (= softmax over the selected logits, GShard/Mixtral).
- Capacity = ceil(T * K / E * capacity_factor). When an expert is over capacity, priority
  goes by choice rank first, then sequence position: every token's first choice is placed
  before any second choice, and among equal ranks the earlier token (in flattened
  [batch, seq] order) wins. This is GShard/Switch's position priority; a dropped
  assignment contributes zero and the residual stream carries the token.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """ceil(T * K / E * cf); None when dropless (cf None or 0)."""
    if capacity_factor is None or capacity_factor == 0:
        return None
    # Round before ceil: float error must not add a slot to an exact product
    # (100 tokens / 2 experts * 1.1 is 55.00000000000001 in floating point; capacity is 55).
    return math.ceil(round(num_tokens * top_k / num_experts * capacity_factor, 9))


def topk_softmax(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (expert_TK, weight_TK, probs_TE); ties to the lower expert index."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    # A stable descending sort fixes the tie rule; torch.topk leaves it unspecified.
    _, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    expert_TK = order_TE[:, :top_k]
    weight_TK = probs_TE.gather(1, expert_TK)
    if top_k > 1:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return expert_TK, weight_TK, probs_TE


def position_in_expert(expert_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each assignment, how many higher-priority assignments chose the same expert.

    Priority order is (choice rank k, token t), see the module docstring. O(TK log TK) via a
    stable sort, no [T, E] or [T, E, capacity] one-hot tensors.
    """
    T, K = expert_TK.shape
    expert_P = expert_TK.t().reshape(-1)  # P = K*T assignments in priority order
    order_P = torch.sort(expert_P, stable=True).indices
    counts_E = torch.bincount(expert_P, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted = torch.arange(expert_P.numel(), device=expert_P.device) - starts_E[expert_P[order_P]]
    pos_P = torch.empty_like(pos_sorted)
    pos_P[order_P] = pos_sorted
    return pos_P.view(K, T).t()


def capacity_mask(expert_TK: torch.Tensor, num_experts: int, capacity: Optional[int]) -> torch.Tensor:
    """Boolean [T, K]: True for assignments that fit in their expert's capacity."""
    if capacity is None:
        return torch.ones_like(expert_TK, dtype=torch.bool)
    return position_in_expert(expert_TK, num_experts) < capacity


def switch_load_balancing_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i (unweighted): f_i = share of the T*K assignments routed to i (before
    drops, not differentiable), P_i = mean router probability of i. Equals 1 at uniform routing
    for any K, so alpha * this equals alpha there."""
    T, E = probs_TE.shape
    counts_E = torch.bincount(expert_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / expert_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE), unweighted."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
