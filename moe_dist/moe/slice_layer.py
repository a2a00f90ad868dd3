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
- Slice capacity loss alpha * CV^2 of per-expert loads: the paper's hard counts (pairs routed
  to each expert over the global batch) are the loss's value. Counts have no gradient, so the
  gradient flows through K * importance (each expert's summed FULL softmax probability,
  Shazeer et al. 2017) by a straight-through estimator, the way Switch's f_i * P_i pairs a
  hard count with a soft probability. The renormalised top-k weights would not do: they are
  a softmax over the selected logits only, so an expert no pair selects (the one the loss
  must revive) would get exactly zero gradient.
- Cross-slice dropout (training): each of a slice's top-k weights is dropped with
  probability slice_dropout, never all k, and the survivors renormalised to sum 1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.models.init import normal_
from moe_dist.moe.aux import MoEAux
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.dispatch import dispatch_order, expert_counts
from moe_dist.moe.experts import GroupedExperts, autocast_input
from moe_dist.moe.layer import router_dtype, routing_aux
from moe_dist.moe.noise import SALT_EXPERT_DROPOUT, SALT_SLICE_DROPOUT, dropout_mask
from moe_dist.moe.router import RouterLinear, route_topk
from moe_dist.ops.combine import combine_slots
from moe_dist.parallel.expert_parallel import ExpertParallel


def cross_slice_dropout(
    weight_PK: torch.Tensor, rate: float, noise_2: Optional[torch.Tensor] = None, slices: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each weight with probability `rate`, never all of a row (the top choice survives
    then); renormalise survivors to sum 1. Returns (weights, dropped mask). A row whose
    survivors' weights sum to exactly 0 (a renormalised top-k weight underflows to 0 once
    the logit gap passes ~104 in float32) drops nothing: renormalising it would be 0/0.
    noise_2 (moe/noise.py; None: torch.rand) draws per global pair, `slices` pairs a token."""
    drop_PK = dropout_mask(noise_2, weight_PK, rate, slices, SALT_SLICE_DROPOUT)
    all_dropped_P1 = drop_PK.all(dim=1, keepdim=True)
    first_col = torch.zeros_like(drop_PK)
    first_col[:, 0] = True
    drop_PK = drop_PK & ~(all_dropped_P1 & first_col)
    w_PK = weight_PK.masked_fill(drop_PK, 0.0)
    dead_P1 = w_PK.sum(dim=1, keepdim=True) == 0
    drop_PK = drop_PK & ~dead_P1
    w_PK = torch.where(dead_P1, weight_PK, w_PK)
    return w_PK / w_PK.sum(dim=1, keepdim=True), drop_PK


class SliceRouter(nn.Module):
    """The router MLP shared by every slice: Ds -> hidden -> E, ReLU."""

    def __init__(self, d_slice: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1 = RouterLinear(d_slice, hidden)
        self.fc2 = RouterLinear(hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SliceMoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, act: str, ep: Optional[ExpertParallel] = None):
        super().__init__()
        self.cfg = cfg
        self.num_slices, self.d_slice = cfg.num_slices, d_model // cfg.num_slices
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.ep = ep if ep is not None else ExpertParallel()
        self.router = SliceRouter(self.d_slice, cfg.slice_router_hidden, cfg.num_experts)
        self.balance = BalanceBias(cfg.num_experts, cfg.bias_update_rate)
        self.experts = GroupedExperts(cfg.num_experts, self.d_slice, cfg.d_expert, act, cfg.grouped_mm, bias=True)

    def reset_parameters(self, std: float, std_out: float, gain: Optional[float] = None) -> None:
        for fc in (self.router.fc1, self.router.fc2):
            normal_(fc.weight, std, gain, fc.weight.shape[1])
            nn.init.zeros_(fc.bias)
        scale = self.cfg.expert_init_scale
        self.experts.reset_parameters(std * scale, std_out * scale, None if gain is None else gain * scale,
                                      pooled=False)  # softmax weights that sum to 1

    def shard_experts(self) -> None:
        """Keep only this rank's experts (expert parallelism); call after init."""
        if self.ep.size > 1:
            self.experts.shard(*self.ep.local_range(self.num_experts))

    def forward(
        self, x_BSD: torch.Tensor, x_route_BSD: Optional[torch.Tensor] = None, noise_2: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        P, E, K, cfg = B * S * self.num_slices, self.num_experts, self.top_k, self.cfg
        x_PDs = x_BSD.reshape(P, self.d_slice)
        route_PDs = x_PDs if x_route_BSD is None else x_route_BSD.reshape(P, self.d_slice)
        dtype = router_dtype(route_PDs)
        timer = self.ep.timer(x_BSD.device)
        with torch.autocast(device_type=x_BSD.device.type, enabled=False):
            logits_PE = self.router(route_PDs.to(dtype))
            exclude = None
            if self.training and cfg.expert_dropout > 0:
                exclude = dropout_mask(noise_2, logits_PE, cfg.expert_dropout, self.num_slices, SALT_EXPERT_DROPOUT)
            bias = self.balance.bias[0] if self.balance.enabled else None
            expert_PK, weight_PK, probs_PE = route_topk(logits_PE, K, "softmax", bias, exclude)
            slice_drop_PK = None
            if self.training and cfg.slice_dropout > 0 and K > 1:
                weight_PK, slice_drop_PK = cross_slice_dropout(weight_PK, cfg.slice_dropout, noise_2, self.num_slices)
            cf = cfg.capacity_factor_for(self.training)
            # A weight dropped by cross-slice dropout is not computed, so it takes no slot.
            active_PK = None if slice_drop_PK is None else ~slice_drop_PK
            counts_E = expert_counts(expert_PK, E)  # once: see MoEFFN.route
            keep_PK = self.ep.capacity_mask(expert_PK, E, cf, active_PK, counts_E=counts_E)
            # Drops counted are capacity drops only: the dropout ones are `skipped`.
            capacity_keep_PK = keep_PK if slice_drop_PK is None else keep_PK | slice_drop_PK
            aux = routing_aux(self.ep, "ffn", logits_PE, probs_PE, expert_PK, capacity_keep_PK, cfg, cf,
                              cfg.slice_cap_loss_weight, rows_per_seq=S * self.num_slices, counts_E=counts_E)
            if slice_drop_PK is not None:
                aux.skipped = slice_drop_PK.sum()  # counted, never silent
        aux.balance_bias = self.balance.live_bias
        self.balance.observe(counts_E)
        timer.lap("route")
        # 1. sort (token, slice) assignments by expert (moe/dispatch.py)  2. scale each slice by its
        # weight  3. expert FFNs  4. sum back into the slice's row, slices in order
        # Nothing dropped (dropless, no slice dropout): no mask, so no host sync.
        all_kept = aux.capacity is None and slice_drop_PK is None
        keep_P = None if all_kept else keep_PK.reshape(-1)
        assignment_N, tokens_per_expert_E, dropped_N, kept_E = dispatch_order(
            expert_PK.reshape(-1), keep_P, E, self.ep.size, counts_E
        )
        pair_N = torch.div(assignment_N, K, rounding_mode="floor")
        w_N = weight_PK.reshape(-1)[assignment_N]
        # The weight scales the expert INPUT: gather and scale here (the dispatch buffer).
        # Dispatch in the compute dtype. index_select, not x[pair_N]: deterministic
        # gradients (see ops/__init__.py). At ep > 1 this copies the dropped assignments
        # too (sorted last, not sent): a copy, where leaving them out would take a second sync.
        x_ND = autocast_input(x_PDs.index_select(0, pair_N) * w_N.to(x_PDs.dtype).unsqueeze(1))
        y_ND, aux.sent_bytes = self.ep.run(x_ND, None, tokens_per_expert_E, self.experts, timer)
        if dropped_N is not None:  # computed (GPU, compile: moe/dispatch.py). Zero the
            # output, not only the weight: the experts' biases map a zero input to nonzero.
            y_ND = y_ND.masked_fill(dropped_N.unsqueeze(1), 0)
        # At ep > 1 only the kept prefix ran (moe/dispatch.py). Each row to its slot, then a
        # pair's K slots summed: no float atomics, one rounding (ops/combine.py).
        n = y_ND.shape[0]
        y_PDs = combine_slots(y_ND, assignment_N[:n], P * K, K, row_N=pair_N[:n])
        timer.lap("combine")
        aux.kept_per_expert, aux.timer = kept_E, timer
        return y_PDs.view(B, S, D), aux
