"""SliceMoE FFN (arXiv 2510.04286): each token's hidden vector is cut into S contiguous
slices, and every slice is routed to its own top-k experts.

Legend: T tokens, D model dim, S slices, Ds = D/S slice dim, P = T*S (token, slice) pairs
(token-major: pair p is token p // S, slice p % S), E experts, K top-k, N routed rows.

- One router MLP shared by all slices and tokens: Linear(Ds, hidden) -> ReLU -> Linear(hidden, E);
  softmax top-k per slice, the k weights renormalised to sum 1 (as in token-level MoE, so
  that S=1 is token-level MoE).
- The slice sent to expert e is scaled by its weight BEFORE the expert (p_e * h^(s)), and
  experts are biased FFNs on Ds dims: W2 act(W1 x + b1) + b2. A slice's output is the sum over
  its k experts; slices are reassembled in order.
- Slice capacity loss alpha * CV^2 of per-expert loads. Hard slice counts have no gradient,
  so the loss uses soft loads (each expert's summed routing weight over the batch, Shazeer
  et al. 2017's "importance"); the hard counts are logged as tokens_per_expert.
- Cross-slice dropout (training): each of a slice's top-k weights is dropped with
  probability slice_dropout, never all k, and the survivors renormalised to sum 1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.moe.aux import MoEAux
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.dispatch import LocalDispatcher, row_weights
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import router_dtype
from moe_dist.moe.router import (
    capacity_mask,
    cv_squared,
    expert_capacity,
    route_topk,
    router_z_loss,
    switch_load_balancing_loss,
)


def cross_slice_dropout(weight_PK: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each weight with probability `rate`, never all of a row (the top choice survives
    then); renormalise survivors to sum 1. Returns (weights, dropped mask)."""
    drop_PK = torch.rand_like(weight_PK) < rate
    all_dropped_P1 = drop_PK.all(dim=1, keepdim=True)
    first_col = torch.zeros_like(drop_PK)
    first_col[:, 0] = True
    drop_PK = drop_PK & ~(all_dropped_P1 & first_col)
    w_PK = weight_PK.masked_fill(drop_PK, 0.0)
    return w_PK / w_PK.sum(dim=1, keepdim=True), drop_PK


class SliceRouter(nn.Module):
    """The router MLP shared by every slice: Ds -> hidden -> E, ReLU."""

    def __init__(self, d_slice: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(d_slice, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SliceMoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, act: str, dispatcher=None):
        super().__init__()
        self.cfg = cfg
        self.num_slices, self.d_slice = cfg.num_slices, d_model // cfg.num_slices
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = SliceRouter(self.d_slice, cfg.slice_router_hidden, cfg.num_experts)
        self.balance = BalanceBias(cfg.num_experts, cfg.bias_update_rate)
        self.experts = GroupedExperts(cfg.num_experts, self.d_slice, cfg.d_expert, act, cfg.grouped_mm, bias=True)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(cfg.num_experts)

    def reset_parameters(self, std: float, std_out: float) -> None:
        for fc in (self.router.fc1, self.router.fc2):
            nn.init.normal_(fc.weight, std=std)
            nn.init.zeros_(fc.bias)
        scale = self.cfg.expert_init_scale
        self.experts.reset_parameters(std * scale, std_out * scale)

    def forward(self, x_BSD: torch.Tensor, x_route_BSD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        P = B * S * self.num_slices
        x_PDs = x_BSD.reshape(P, self.d_slice)
        route_PDs = x_PDs if x_route_BSD is None else x_route_BSD.reshape(P, self.d_slice)
        cfg = self.cfg
        dtype = router_dtype(route_PDs)
        with torch.autocast(device_type=x_BSD.device.type, enabled=False):
            logits_PE = self.router(route_PDs.to(dtype))
            exclude = torch.rand_like(logits_PE) < cfg.expert_dropout if self.training and cfg.expert_dropout > 0 else None
            bias = self.balance.bias[0] if self.balance.enabled else None
            expert_PK, weight_PK, probs_PE = route_topk(logits_PE, self.top_k, "softmax", bias, exclude)
            keep_PK = capacity_mask(expert_PK, self.num_experts, expert_capacity(P, self.top_k, self.num_experts, cfg.capacity_factor))
            dropped = (~keep_PK).sum()
            if self.training and cfg.slice_dropout > 0 and self.top_k > 1:
                weight_PK, slice_drop_PK = cross_slice_dropout(weight_PK, cfg.slice_dropout)
                keep_PK = keep_PK & ~slice_drop_PK  # a zero-weight row is not worth computing
            soft_load_E = torch.zeros(self.num_experts, dtype=weight_PK.dtype, device=weight_PK.device)
            soft_load_E = soft_load_E.index_add(0, expert_PK.reshape(-1), weight_PK.reshape(-1))
            loss = cfg.slice_cap_loss_weight * cv_squared(soft_load_E)
            if cfg.lb_loss_weight > 0:
                loss = loss + cfg.lb_loss_weight * switch_load_balancing_loss(probs_PE, expert_PK)
            if cfg.z_loss_weight > 0:
                loss = loss + cfg.z_loss_weight * router_z_loss(logits_PE)
        self.balance.observe(expert_PK)
        # 1. permute kept (token, slice) assignments by expert  2. scale each slice by its
        # weight  3. expert FFNs  4. scatter-add back into the slice's row, slices in order
        x_ND, tokens_per_expert_E, state = self.dispatcher.dispatch(x_PDs, expert_PK, keep_PK)
        x_ND = x_ND * row_weights(weight_PK, state).to(x_ND.dtype).unsqueeze(1)
        y_ND = self.experts(x_ND, tokens_per_expert_E)
        y_PDs = self.dispatcher.combine(y_ND, None, state)
        aux = MoEAux(
            name="ffn",
            group_key=id(self),
            loss=loss.float(),
            tokens_per_expert=torch.bincount(expert_PK.reshape(-1), minlength=self.num_experts).detach(),
            dropped=dropped.detach(),
            assignments=expert_PK.numel(),
            probs_sum=probs_PE.sum(0).float() if cfg.entropy_loss_weight > 0 else None,
            num_rows=P,
            entropy_weight=cfg.entropy_loss_weight,
        )
        return y_PDs.view(B, S, D), aux
