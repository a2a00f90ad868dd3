"""SwitchHead attention (Csordas et al. 2023, arXiv 2312.07987): MoE value and output
projections, one attention matrix per head.

Legend: B batch, S sequence, T = B*S tokens, D model dim, H heads, Dh head dim,
E experts per head, K top-k per head, R = T*H (token, head) rows, N routed rows.
Expert ids are global over heads: head h's expert e is h*E + e (weights [H*E, ...]).

Per head h:
    s_src = sigmoid(x W_S^h)  at the source (key/value) token,  s_dst = sigmoid(x W_D^h) at the destination
    V^h   = sum_{e in topk(s_src)} s_src[e] * x W_V^{h,e}
    A^h   = softmax(Q^h K^h^T / sqrt(Dh)) with the causal mask   (Q, K dense)
    y     = sum_h sum_{e in topk(s_dst)} s_dst[e] * (A^h V^h) W_O^{h,e}
Sigmoid gates, top-k without renormalisation, dropless. Rotary positions replace the
paper's Transformer-XL relative positions (documented in docs/architectures.md).
With E=1, K=1 and gates fixed to 1 this is multi-head attention (tests check it).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.config import AttentionConfig
from moe_dist.models.attention import RotaryQK
from moe_dist.models.init import normal_
from moe_dist.moe.aux import MoEAux, entropy_fields, sequence_probs
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.dispatch import expert_counts, sort_by_expert
from moe_dist.moe.layer import router_dtype
from moe_dist.moe.experts import StackedLinear
from moe_dist.moe.router import RouterLinear, route_topk, router_entropy
from moe_dist.ops.combine import combine_slots
from moe_dist.parallel.expert_parallel import ExpertParallel


class SwitchHeadAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int,
        rope: bool,
        rope_base: float,
        dropout: float,
        cfg: AttentionConfig,
        backend: str = "auto",
        fixed_gates: bool = False,
        ep: Optional[ExpertParallel] = None,
    ):
        super().__init__()
        H, E = n_heads, cfg.num_experts
        self.n_heads, self.head_dim, self.num_experts, self.top_k = H, head_dim, E, cfg.top_k
        self.cfg, self.backend, self.dropout = cfg, backend, dropout
        self.fixed_gates = fixed_gates  # tests: gates = 1 (with E=1, K=1 this is MHA)
        # Expert-parallel placement shards the H*E V and O experts over the ep group like
        # FFN experts; replicated placement passes a one-process ExpertParallel.
        self.ep = ep if ep is not None else ExpertParallel()
        self.qk = RotaryQK(d_model, H, head_dim, max_seq_len, rope, rope_base)
        self.gate_src = RouterLinear(d_model, H * E, bias=False)
        self.gate_dst = RouterLinear(d_model, H * E, bias=False)
        self.experts_v = StackedLinear(H * E, d_model, head_dim, backend)  # G = H*E experts
        self.experts_o = StackedLinear(H * E, head_dim, d_model, backend)
        self.balance_src = BalanceBias(E, cfg.bias_update_rate, groups=H)
        self.balance_dst = BalanceBias(E, cfg.bias_update_rate, groups=H)

    def reset_parameters(self, std: float, std_out: float, gain: Optional[float] = None) -> None:
        D = self.gate_src.weight.shape[1]
        for w in (self.qk.qk.weight, self.gate_src.weight, self.gate_dst.weight, self.experts_v.w_GIO):
            normal_(w, std, gain, D)
        # fan-in of the output side: the H heads' outputs are summed, as in MHA's H*Dh.
        normal_(self.experts_o.w_GIO, std_out, gain, self.n_heads * self.head_dim)

    def shard_experts(self) -> None:
        """Keep only this rank's V and O experts (expert-parallel placement)."""
        if self.ep.size > 1:
            lo_hi = self.ep.local_range(self.n_heads * self.num_experts)
            self.experts_v.shard(*lo_hi)
            self.experts_o.shard(*lo_hi)

    def _route(self, gate: nn.Linear, balance: BalanceBias, x_route_TD: torch.Tensor, name: str, seq_len: int):
        """Per-head sigmoid top-k. Returns (global expert ids [R, K], weights [R, K], aux)."""
        T, H, E, K = x_route_TD.shape[0], self.n_heads, self.num_experts, self.top_k
        timer = self.ep.timer(x_route_TD.device)
        dtype = router_dtype(x_route_TD)
        with torch.autocast(device_type=x_route_TD.device.type, enabled=False):
            logits_RE = gate(x_route_TD.to(dtype)).view(T * H, E)
            bias_RE = balance.bias.repeat(T, 1) if balance.enabled else None  # row r is head r % H
            expert_RK, weight_RK, probs_RE = route_topk(logits_RE, K, "sigmoid", bias_RE)
        if self.fixed_gates:
            weight_RK = torch.ones_like(weight_RK)
        # Head h's experts are global ids h*E ... h*E + E-1.
        first_H1 = torch.arange(0, H * E, E, device=expert_RK.device).unsqueeze(1)
        global_RK = (expert_RK.view(T, H, K) + first_H1).view(T * H, K)
        ep, G = self.ep, H * E
        counts_G = expert_counts(global_RK, G)  # this rank's, once: balance, statistics, sort
        balance.observe(counts_G)
        probs_sum, terms = None, {}
        # Rows travel with the counts (global batch even if ranks' batches differ; >= 1).
        local = [counts_G, torch.full((), T, device=global_RK.device)]
        entropy = self.cfg.entropy_loss_weight > 0
        per_sequence = entropy and self.cfg.entropy_scope == "sequence"
        probs_seq = None
        if per_sequence:  # [B, H, E], this rank's sequences; the logged value summed here
            probs_seq, logged = sequence_probs(probs_RE.view(T, H, E), seq_len)
            local.append(logged)
        elif entropy:
            # [H, E]: the entropy regulariser balances each head's experts, global batch.
            local.append(probs_RE.view(T, H, E).sum(0))
        total = ep.sum_stats_many(local)  # one all-reduce for all
        rows = total[1].clamp_min(1)
        num_rows, num_sequences = rows, None
        if entropy:  # per sequence: the mean over sequences and heads, as the MoEUT code takes it
            probs_sum, num_rows, num_sequences, term = entropy_fields(probs_seq, total[2], rows, seq_len, heads=H)
            terms["entropy_reg"] = term.detach()
        aux = MoEAux(
            name=name,
            loss=torch.zeros((), dtype=torch.float32, device=x_route_TD.device),
            tokens_per_expert=total[0].detach(),
            dropped=torch.zeros((), dtype=torch.long, device=x_route_TD.device),
            assignments=global_RK.numel() * ep.world,
            probs_sum=probs_sum,
            num_rows=num_rows,
            num_sequences=num_sequences,
            sum_over_ranks=ep.sum_stats_many if per_sequence else None,
            entropy_weight=self.cfg.entropy_loss_weight,
            router_entropy_sum=router_entropy(probs_RE).detach(),
            local_rows=T * H,
            terms=terms,
            balance_bias=balance.live_bias,
            timer=timer,
            kept_per_expert=counts_G,  # dropless: every assignment is kept
        )
        timer.lap("route")
        return global_RK, weight_RK, aux

    def _experts(self, rows_MD, global_RK, weight_RK, experts, src_div: int, dst_div: int, n_out: int, aux):
        """sum over selected experts of weight * rows[src] @ W[expert], scattered to dst.

        Assignment a (of R*K) reads row a // src_div and writes row a // dst_div.
        """
        # aux.kept_per_expert: this rank's counts from _route (dropless), not counted again.
        assignment_N, counts_G = sort_by_expert(
            global_RK.reshape(-1), None, self.n_heads * self.num_experts, aux.kept_per_expert
        )
        src_N = torch.div(assignment_N, src_div, rounding_mode="floor")
        y_NO, aux.sent_bytes = self.ep.run(rows_MD, src_N, counts_G, experts, aux.timer)
        # Output row m sums assignments m*dst_div ... (m+1)*dst_div - 1, weighted in slot
        # order. Not index_add(dst_N): under activation checkpointing (moe/recompute.py) the
        # block's FFN router reads this output again in the backward, and on CUDA index_add's
        # atomics could change its last bit and send a near-tie to another expert
        # (ops/combine.py).
        y_MO = combine_slots(y_NO, assignment_N, global_RK.numel(), dst_div, weight_RK.reshape(-1))
        aux.timer.lap("combine")
        return y_MO

    def forward(self, x_BSD: torch.Tensor, x_route_BSD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[MoEAux]]:
        B, S, D = x_BSD.shape
        T, H, Dh, K = B * S, self.n_heads, self.head_dim, self.top_k
        x_route_BSD = x_BSD if x_route_BSD is None else x_route_BSD
        x_TD, x_route_TD = x_BSD.reshape(T, D), x_route_BSD.reshape(T, D)
        if torch.is_autocast_enabled(x_TD.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        q, k = self.qk(x_route_BSD)

        # Value side: routed at the source token. Assignment a = (t*H + h)*K + j reads token
        # a // (H*K) and writes the (token, head) row a // K.
        src_RK, src_w_RK, aux_src = self._route(self.gate_src, self.balance_src, x_route_TD, "attn_src", S)
        v_RDh = self._experts(x_TD, src_RK, src_w_RK, self.experts_v, H * K, K, T * H, aux_src)
        v = v_RDh.view(B, S, H, Dh).transpose(1, 2)

        # One attention matrix per head, whatever K is.
        att = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        att_RDh = att.transpose(1, 2).reshape(T * H, Dh)

        # Output side: routed at the destination token. Assignment a reads the (token, head)
        # row a // K and writes token a // (H*K).
        dst_RK, dst_w_RK, aux_dst = self._route(self.gate_dst, self.balance_dst, x_route_TD, "attn_dst", S)
        y_TD = self._experts(att_RDh, dst_RK, dst_w_RK, self.experts_o, K, H * K, T, aux_dst)
        return y_TD.view(B, S, D), [aux_src, aux_dst]
