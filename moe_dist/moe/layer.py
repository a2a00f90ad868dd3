"""Token-choice top-k MoE FFN: Switch (softmax top-1), GShard/Mixtral (softmax top-k,
renormalised) and sigma-MoE (sigmoid top-k, not renormalised), with shared experts.

Legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k, N routed rows.

forward(x_BSD, x_route_BSD=None, noise_2=None) -> (y_BSD, MoEAux). The router reads x_route
(MoEUT's peri-layernorm normalises only the router input); the experts read x. noise_2:
expert dropout's draws as a function of the global row (moe/noise.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.models.ffn import FFN
from moe_dist.models.init import normal_
from moe_dist.moe.aux import MoEAux, entropy_fields, sequence_probs
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.dispatch import dispatch_order, expert_counts
from moe_dist.moe.experts import GroupedExperts, autocast_input
from moe_dist.moe.noise import SALT_EXPERT_DROPOUT, dropout_mask
from moe_dist.moe.router import (
    RouterLinear,
    cv_squared,
    expert_capacity,
    route_topk,
    router_entropy,
    straight_through_load,
    switch_lb_loss_from_sums,
)
from moe_dist.ops.combine import combine_slots
from moe_dist.parallel.expert_parallel import ExpertParallel


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 compute still routes in fp32); float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, act: str, score: str = "softmax", ep: Optional[ExpertParallel] = None):
        super().__init__()
        self.cfg, self.score = cfg, score
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.ep = ep if ep is not None else ExpertParallel()
        self.router = RouterLinear(d_model, cfg.num_experts, bias=False)
        self.balance = BalanceBias(cfg.num_experts, cfg.bias_update_rate)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.d_expert, act, cfg.grouped_mm)
        self.shared: Optional[FFN] = None
        if cfg.num_shared_experts > 0:
            self.shared = FFN(d_model, cfg.num_shared_experts * cfg.d_expert, act)

    def reset_parameters(self, std: float, std_out: float, gain: Optional[float] = None) -> None:
        normal_(self.router.weight, std, gain, self.router.weight.shape[1])
        scale = self.cfg.expert_init_scale
        self.experts.reset_parameters(std * scale, std_out * scale, None if gain is None else gain * scale,
                                      pooled=self.score == "sigmoid")
        if self.shared is not None:
            self.shared.reset_parameters(std, std_out, gain)

    def shard_experts(self) -> None:
        """Keep only this rank's experts (expert parallelism); call after init."""
        if self.ep.size > 1:
            self.experts.shard(*self.ep.local_range(self.num_experts))

    def route(self, x_TD: torch.Tensor, seq_len: Optional[int] = None, noise_2: Optional[torch.Tensor] = None):
        """Router in float32 (autocast off), top-k, capacity. Returns (expert_TK, weight_TK,
        keep_TK, aux, counts_E), counts_E this rank's assignments per expert before drops.
        seq_len: rows per sequence (moe.entropy_scope=sequence; default: one sequence).
        noise_2: the expert dropout's (key, first global row) (moe/noise.py); None: torch.rand."""
        E, K, cfg = self.num_experts, self.top_k, self.cfg
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # The router's parameters are float32 master weights (float64 in tests).
            logits_TE = self.router(x_TD.to(dtype))
            exclude = None
            if self.training and cfg.expert_dropout > 0:
                exclude = dropout_mask(noise_2, logits_TE, cfg.expert_dropout, salt=SALT_EXPERT_DROPOUT)
            bias = self.balance.bias[0] if self.balance.enabled else None
            expert_TK, weight_TK, probs_TE = route_topk(logits_TE, K, self.score, bias, exclude)
            cf = cfg.capacity_factor_for(self.training)
            # Counted once, for capacity, the statistics and the dispatch: each count is a
            # few launches, and launches are a small layer's cost (tools/count_layer_ops.py).
            counts_E = expert_counts(expert_TK, E)
            keep_TK = self.ep.capacity_mask(expert_TK, E, cf, counts_E=counts_E)
            aux = routing_aux(self.ep, "ffn", logits_TE, probs_TE, expert_TK, keep_TK, cfg, cf,
                              rows_per_seq=seq_len or max(x_TD.shape[0], 1), counts_E=counts_E)
        aux.balance_bias = self.balance.live_bias
        self.balance.observe(counts_E)
        return expert_TK, weight_TK, keep_TK, aux, counts_E

    def forward(
        self, x_BSD: torch.Tensor, x_route_BSD: Optional[torch.Tensor] = None, noise_2: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        x_route_TD = x_TD if x_route_BSD is None else x_route_BSD.reshape(B * S, D)
        timer = self.ep.timer(x_TD.device)
        expert_TK, weight_TK, keep_TK, aux, counts_E = self.route(x_route_TD, S, noise_2)
        timer.lap("route")
        # 1. sort assignments by expert (moe/dispatch.py: capacity drops)  2. expert FFNs (across ranks under ep)
        # 3. scale by routing weight and sum each token's rows
        keep_P = None if aux.capacity is None else keep_TK.reshape(-1)  # dropless: no mask, no sync
        assignment_N, tokens_per_expert_E, dropped_N, kept_E = dispatch_order(
            expert_TK.reshape(-1), keep_P, self.num_experts, self.ep.size, counts_E
        )
        if self.ep.size == 1:  # all experts here: steps 1-3 in one op, no [N, D] copies
            w_N = weight_TK.reshape(-1).index_select(0, assignment_N)
            if dropped_N is not None:  # computed (GPU, compile: moe/dispatch.py): weight 0, no gradient
                w_N = w_N.masked_fill(dropped_N, 0)
            y_TD = self.experts.dispatch_and_combine(x_TD, tokens_per_expert_E, assignment_N, self.top_k, w_N)
            aux.sent_bytes = []
            timer.lap("compute")
        else:
            token_N = torch.div(assignment_N, self.top_k, rounding_mode="floor")
            # Dispatch in the compute dtype (bf16 under autocast): half the all-to-all bytes.
            y_ND, aux.sent_bytes = self.ep.run(autocast_input(x_TD), token_N, tokens_per_expert_E, self.experts, timer)
            # run() computed the kept prefix of the assignments (the dropped ones sort last).
            # Each row to its slot, weighted in slot order, a token's K slots summed: no
            # float atomics and one rounding (ops/combine.py); dropped slots stay zero.
            y_TD = combine_slots(y_ND, assignment_N[: y_ND.shape[0]], B * S * self.top_k, self.top_k,
                                 weight_TK.reshape(-1))
            timer.lap("combine")
        aux.kept_per_expert, aux.timer = kept_E, timer
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD).to(y_TD.dtype)
        return y_TD.view(B, S, D), aux


def global_capacity(ep: ExpertParallel, T: int, K: int, E: int, capacity_factor) -> Optional[int]:
    """An expert's capacity summed over the world's ep groups (capacity_mask applies it per ep
    group of T * ep.size rows): what counts summed over the world compare against."""
    per_group = expert_capacity(T * ep.size, K, E, capacity_factor)
    return None if per_group is None else per_group * (ep.world // ep.size)


def routing_aux(
    ep: ExpertParallel,
    name: str,
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    expert_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    cfg: MoEConfig,
    capacity_factor: Optional[float],
    slice_cap_loss_weight: Optional[float] = None,
    rows_per_seq: int = 1,
    counts_E: Optional[torch.Tensor] = None,
) -> MoEAux:
    """Losses and statistics of one routed call, over the global batch (summed over every
    rank, autograd through the sums), so they equal one process's on the same batch.
    slice_cap_loss_weight: a SliceMoE call's capacity loss, weight x CV^2 of the
    straight-through loads, built from this call's counts and softmax sums (None: not SliceMoE).
    rows_per_seq: routed rows of one sequence (its tokens, or (token, slice) pairs), for
    moe.entropy_scope=sequence. counts_E: expert_counts(expert_TK), if the caller has them."""
    T, K = expert_TK.shape
    E = logits_TE.shape[1]
    entropy = cfg.entropy_loss_weight > 0
    per_sequence = entropy and cfg.entropy_scope == "sequence"
    # Every sum over the global batch in one all-reduce: rows, counts, drops, the loss sums.
    # The row count travels too, so ranks with unequal batches still normalise by the
    # global batch; clamped to 1 so that a call with no rows gives zero losses, not 0/0.
    dropless = capacity_factor is None or capacity_factor == 0  # nothing is dropped for capacity
    local = {
        "rows": torch.full((), T, dtype=torch.long, device=expert_TK.device),
        "counts": expert_counts(expert_TK, E) if counts_E is None else counts_E,
        "dropped": expert_TK.new_zeros(()) if dropless else (~keep_TK).sum(),
    }
    slice_cap = slice_cap_loss_weight is not None
    if cfg.lb_loss_weight > 0 or (entropy and not per_sequence) or slice_cap:
        local["probs"] = probs_TE.sum(0)
    probs_seq = None
    if per_sequence:  # this rank's sequences; only the logged per-call value is summed here
        probs_seq, local["entropy"] = sequence_probs(probs_TE, rows_per_seq)
    if cfg.z_loss_weight > 0:
        local["z"] = torch.logsumexp(logits_TE, dim=-1).square().sum()
    total = dict(zip(local, ep.sum_stats_many(list(local.values()))))
    world_counts_E = total["counts"]
    rows = total["rows"].clamp_min(1)
    weighted: list[torch.Tensor] = []  # summed without a zero to start from: one add fewer
    terms: dict[str, torch.Tensor] = {}
    if cfg.lb_loss_weight > 0:
        terms["switch_lb"] = switch_lb_loss_from_sums(total["probs"], world_counts_E, rows, K)
        weighted.append(cfg.lb_loss_weight * terms["switch_lb"])
    if cfg.z_loss_weight > 0:
        terms["z_loss"] = total["z"] / rows
        weighted.append(cfg.z_loss_weight * terms["z_loss"])
    if slice_cap:
        cv2 = cv_squared(straight_through_load(world_counts_E, total["probs"], K))
        weighted.append(slice_cap_loss_weight * cv2)
    loss = logits_TE.new_zeros(()) if not weighted else weighted[0]
    for w in weighted[1:]:
        loss = loss + w
    probs_sum, num_rows, num_sequences = None, rows, None
    if entropy:
        probs_sum, num_rows, num_sequences, terms["entropy_reg"] = entropy_fields(
            probs_seq, total["entropy" if per_sequence else "probs"], rows, rows_per_seq
        )
    if slice_cap:
        terms["slice_cv2"] = cv2
    return MoEAux(
        name=name,
        loss=loss.float(),
        tokens_per_expert=world_counts_E.detach(),
        dropped=total["dropped"].detach(),
        assignments=T * ep.world * K,  # a traffic statistic: the trainer's batches are equal
        probs_sum=probs_sum,
        num_rows=num_rows,
        num_sequences=num_sequences,
        sum_over_ranks=ep.sum_stats_many if per_sequence else None,
        entropy_weight=cfg.entropy_loss_weight,
        capacity=global_capacity(ep, T, K, E, capacity_factor),
        router_entropy_sum=router_entropy(probs_TE).detach(),
        local_rows=T,
        terms={k: v.detach().float() for k, v in terms.items()},
    )
