"""Top-k routing (softmax or sigmoid scores), expert capacity, and the balancing losses.

Legend: T routed rows (tokens, or (token, slice) pairs), E experts, K top-k.

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

from moe_dist.moe.dispatch import expert_counts


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """ceil(T * K / E * cf); None when dropless (cf None or 0)."""
    if capacity_factor is None or capacity_factor == 0:
        return None
    # Round before ceil: float error must not add a slot to an exact product
    # (100 tokens / 2 experts * 1.1 is 55.00000000000001 in floating point; capacity is 55).
    return math.ceil(round(num_tokens * top_k / num_experts * capacity_factor, 9))


def route_topk(
    logits_TE: torch.Tensor,
    top_k: int,
    score: str = "softmax",
    select_bias_E: Optional[torch.Tensor] = None,
    exclude_TE: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing. Returns (expert_TK, weight_TK, probs_TE).

    score="softmax": s = softmax(logits); k >= 2 renormalises the k weights (GShard).
    score="sigmoid": s = sigmoid(logits); weights are the raw scores (sigma-MoE, SwitchHead).
    select_bias_E (aux-loss-free balancing) and exclude_TE (expert dropout: True = not
    selectable; a row where fewer than top_k would remain excludes none) change which
    experts are selected, never the weights.
    probs_TE is softmax(logits) for both scores: the distribution the balancing losses use.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    scores_TE = probs_TE if score == "softmax" else torch.sigmoid(logits_TE)
    select_TE = scores_TE.detach()
    if select_bias_E is not None:
        select_TE = select_TE + select_bias_E
    if exclude_TE is not None:
        # A row left with fewer than K selectable experts drops none: the top-k would
        # otherwise pick excluded (-inf) experts anyway, at full weight.
        enough_T1 = (~exclude_TE).sum(dim=-1, keepdim=True) >= top_k
        select_TE = select_TE.masked_fill(exclude_TE & enough_T1, float("-inf"))
    if top_k == 1:  # argmax returns the first maximum: the same tie rule, 10x cheaper on CPU
        expert_TK = select_TE.argmax(dim=-1, keepdim=True)
    else:  # A stable descending sort fixes the tie rule; torch.topk leaves it unspecified.
        # Contiguous: every later use flattens it, which would copy a strided slice each time.
        expert_TK = torch.sort(select_TE, dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()
    if score == "softmax" and top_k > 1:
        # p_i / sum of the selected p_j, computed as the softmax of the selected logits (the
        # same value): a small layer's cost is its launches, and this backward takes 4
        # fewer (tools/count_layer_ops.py).
        return expert_TK, torch.softmax(logits_TE.gather(1, expert_TK), dim=-1), probs_TE
    return expert_TK, scores_TE.gather(1, expert_TK), probs_TE


def topk_softmax(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: (expert_TK, weight_TK, probs_TE); ties to the lower expert index."""
    return route_topk(logits_TE, top_k, "softmax")


def position_in_expert(
    expert_TK: torch.Tensor, num_experts: int, counts_E: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """For each assignment, how many higher-priority assignments chose the same expert.

    Priority order is (choice rank k, token t), see the module docstring. O(TK log TK) via a
    stable sort, no [T, E] or [T, E, capacity] one-hot tensors. counts_E: expert_counts of
    expert_TK, if the caller has them.
    """
    T, K = expert_TK.shape
    expert_P = expert_TK.t().reshape(-1)  # P = K*T assignments in priority order
    sorted_P, order_P = torch.sort(expert_P, stable=True)
    if counts_E is None:
        counts_E = expert_counts(expert_P, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted = torch.arange(expert_P.numel(), device=expert_P.device) - starts_E[sorted_P]
    pos_P = torch.empty_like(pos_sorted)
    pos_P[order_P] = pos_sorted
    return pos_P.view(K, T).t()


def capacity_mask(
    expert_TK: torch.Tensor, num_experts: int, capacity: Optional[int], counts_E: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Boolean [T, K]: True for assignments that fit in their expert's capacity."""
    if capacity is None:
        return torch.ones_like(expert_TK, dtype=torch.bool)
    return position_in_expert(expert_TK, num_experts, counts_E) < capacity


def switch_load_balancing_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i (unweighted): f_i = share of the T*K assignments routed to i (before
    drops, not differentiable), P_i = mean router probability of i. Equals 1 at uniform routing
    for any K, so alpha * this equals alpha there."""
    T, K = expert_TK.shape
    counts_E = expert_counts(expert_TK, probs_TE.shape[1])
    return switch_lb_loss_from_sums(probs_TE.sum(0), counts_E, T, K)


def switch_lb_loss_from_sums(probs_sum_E: torch.Tensor, counts_E: torch.Tensor, num_rows: int, top_k: int) -> torch.Tensor:
    """The Switch loss from batch sums (for sums taken over several ranks):
    f_i = counts_i / (rows * K), P_i = probs_sum_i / rows, loss = E * sum_i f_i P_i.
    Written as <coef, probs_sum> with coef = E * f / rows built outside autograd (counts
    have no gradient): its backward is one multiply."""
    E = probs_sum_E.numel()
    with torch.no_grad():
        coef_E = counts_E.to(probs_sum_E.dtype) * (E / top_k) / (num_rows * num_rows)
    return torch.dot(coef_E, probs_sum_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE), unweighted."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def entropy_regularizer(probs_sum_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """sum_e p_e log p_e of the mean routing distribution p = probs_sum / rows (sigma-MoE).
    Minimising it maximises the entropy of the average selection: balanced use. It is -log E
    at perfect balance and 0 when one expert takes everything."""
    p_E = probs_sum_E / num_rows
    return torch.sum(p_E * torch.log(p_E.clamp_min(1e-30)))


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Sum over rows of each row's entropy -sum_e p log p (nats): log E for a router that
    cannot decide, 0 for a certain one. A statistic, not a loss."""
    return torch.special.entr(probs_TE).sum()  # entr(p) = -p log p, 0 at p = 0


def cv_squared(load_E: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 of per-expert loads, population std (SliceMoE's capacity loss)."""
    mean = load_E.mean()
    return load_E.var(correction=0) / mean.square().clamp_min(1e-30)


def straight_through_load(counts_E: torch.Tensor, probs_sum_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """[E] per-expert loads for SliceMoE's capacity loss, from sums over the global batch: the
    value is the hard counts, the gradient that of top_k x importance (probs_sum_E: each
    expert's summed FULL softmax, Shazeer et al. 2017), as Switch's f_i * P_i pairs a hard
    count with a soft probability (see slice_layer.py)."""
    soft_E = top_k * probs_sum_E
    return counts_E.to(soft_E.dtype) + (soft_E - soft_E.detach())


class RouterLinear(torch.nn.Linear):
    """A Linear that computes in its input's dtype. Routers run in float32 even where the
    parameters are bf16 (DeepSpeed's bf16 mode casts the whole model; its optimizer keeps
    the float32 master copy). The cast happens inside this module's forward, where ZeRO-3
    has gathered the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)
