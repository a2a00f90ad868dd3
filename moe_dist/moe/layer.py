"""Token-choice top-k MoE FFN: Switch (softmax top-1), GShard/Mixtral (softmax top-k,
renormalised) and sigma-MoE (sigmoid top-k, not renormalised), with shared experts.

Legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k, N routed rows.

forward(x_BSD, x_route_BSD=None) -> (y_BSD, MoEAux). The router reads x_route (MoEUT's
peri-layernorm normalises only the router input); the experts read x.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.models.ffn import FFN
from moe_dist.moe.aux import MoEAux
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.dispatch import LocalDispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.router import (
    capacity_mask,
    expert_capacity,
    route_topk,
    router_z_loss,
    switch_load_balancing_loss,
)


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 compute still routes in fp32); float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, act: str, score: str = "softmax", dispatcher=None):
        super().__init__()
        self.cfg, self.score = cfg, score
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.balance = BalanceBias(cfg.num_experts, cfg.bias_update_rate)
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
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # The router's parameters are float32 master weights (float64 in tests).
            logits_TE = self.router(x_TD.to(dtype))
            exclude = None
            if self.training and self.cfg.expert_dropout > 0:
                exclude = torch.rand_like(logits_TE) < self.cfg.expert_dropout
            bias = self.balance.bias[0] if self.balance.enabled else None
            expert_TK, weight_TK, probs_TE = route_topk(logits_TE, self.top_k, self.score, bias, exclude)
            capacity = expert_capacity(T, self.top_k, self.num_experts, self.cfg.capacity_factor)
            keep_TK = capacity_mask(expert_TK, self.num_experts, capacity)
            loss = logits_TE.new_zeros(())
            if self.cfg.lb_loss_weight > 0:
                loss = loss + self.cfg.lb_loss_weight * switch_load_balancing_loss(probs_TE, expert_TK)
            if self.cfg.z_loss_weight > 0:
                loss = loss + self.cfg.z_loss_weight * router_z_loss(logits_TE)
        self.balance.observe(expert_TK)
        aux = MoEAux(
            name="ffn",
            group_key=id(self),
            loss=loss.float(),
            tokens_per_expert=torch.bincount(expert_TK.reshape(-1), minlength=self.num_experts).detach(),
            dropped=(~keep_TK).sum().detach(),
            assignments=expert_TK.numel(),
            probs_sum=probs_TE.sum(0).float() if self.cfg.entropy_loss_weight > 0 else None,
            num_rows=T,
            entropy_weight=self.cfg.entropy_loss_weight,
        )
        return expert_TK, weight_TK, keep_TK, aux

    def forward(self, x_BSD: torch.Tensor, x_route_BSD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        x_route_TD = x_TD if x_route_BSD is None else x_route_BSD.reshape(B * S, D)
        expert_TK, weight_TK, keep_TK, aux = self.route(x_route_TD)
        # 1. permute kept assignments by expert  2. expert FFNs  3. weight and scatter back
        x_ND, tokens_per_expert_E, state = self.dispatcher.dispatch(x_TD, expert_TK, keep_TK)
        y_ND = self.experts(x_ND, tokens_per_expert_E)
        y_TD = self.dispatcher.combine(y_ND, weight_TK, state)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD).to(y_TD.dtype)
        return y_TD.view(B, S, D), aux
