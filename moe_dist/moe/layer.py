"""Token-choice top-k MoE FFN (Switch top-1, GShard/Mixtral top-k), with optional shared experts.

Legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k, N routed rows.

forward(x_BSD) -> (y_BSD, MoEAux). The auxiliary losses and routing statistics are returned,
not stored in globals; the trainer sums `aux.loss` over layers and logs the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.config import MoEConfig
from moe_dist.models.ffn import FFN
from moe_dist.moe.dispatch import LocalDispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.router import (
    capacity_mask,
    expert_capacity,
    router_z_loss,
    switch_load_balancing_loss,
    topk_softmax,
)


@dataclass
class MoEAux:
    loss: torch.Tensor
    """Weighted auxiliary loss of this layer: lb_weight * lb_loss + z_weight * z_loss."""
    lb_loss: torch.Tensor
    """Switch load-balancing loss E * sum f_i P_i (unweighted; 1.0 at uniform routing)."""
    z_loss: torch.Tensor
    """Router z-loss (unweighted)."""
    tokens_per_expert: torch.Tensor
    """[E] assignments routed to each expert before capacity drops (detached, int64)."""
    dropped: torch.Tensor
    """Assignments dropped for capacity (detached, int64 scalar)."""
    assignments: int
    """T * K."""


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, act: str, dispatcher=None):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.d_expert, act, cfg.grouped_mm)
        self.shared: Optional[FFN] = None
        if cfg.num_shared_experts > 0:
            self.shared = FFN(d_model, cfg.num_shared_experts * cfg.d_expert, act)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(cfg.num_experts)

    def reset_parameters(self, std: float, std_out: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        scale = self.cfg.expert_init_scale
        self.experts.reset_parameters(std * scale, std_out * scale)
        if self.shared is not None:
            self.shared.reset_parameters(std, std_out)

    def route(self, x_TD: torch.Tensor):
        """Router in float32 (autocast off), top-k, capacity. Returns (expert, weight, keep, aux)."""
        T = x_TD.shape[0]
        # float32 at least (bf16/fp16 compute still routes in fp32); float64 stays float64.
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(dtype), self.router.weight.to(dtype))
            expert_TK, weight_TK, probs_TE = topk_softmax(logits_TE, self.top_k)
            capacity = expert_capacity(T, self.top_k, self.num_experts, self.cfg.capacity_factor)
            keep_TK = capacity_mask(expert_TK, self.num_experts, capacity)
            lb = switch_load_balancing_loss(probs_TE, expert_TK)
            z = router_z_loss(logits_TE)
        aux = MoEAux(
            loss=self.cfg.lb_loss_weight * lb + self.cfg.z_loss_weight * z,
            lb_loss=lb,
            z_loss=z,
            tokens_per_expert=torch.bincount(expert_TK.reshape(-1), minlength=self.num_experts).detach(),
            dropped=(~keep_TK).sum().detach(),
            assignments=expert_TK.numel(),
        )
        return expert_TK, weight_TK, keep_TK, aux

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        expert_TK, weight_TK, keep_TK, aux = self.route(x_TD)
        # 1. permute kept assignments by expert  2. expert FFNs  3. weight and scatter back
        x_ND, tokens_per_expert_E, state = self.dispatcher.dispatch(x_TD, expert_TK, keep_TK)
        y_ND = self.experts(x_ND, tokens_per_expert_E)
        y_TD = self.dispatcher.combine(y_ND, weight_TK, state)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD).to(y_TD.dtype)
        return y_TD.view(B, S, D), aux
