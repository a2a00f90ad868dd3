"""Expert weights as stacked tensors [E, ...], computed with one grouped matmul per projection.

Legend: N routed rows, D model dim, F expert hidden dim, H = F * hidden_multiplier,
G experts of a single projection (SwitchHead's V or O: G = heads * experts per head).
Stacked tensors (not a ModuleList of Linears) are what grouped GEMMs and expert-parallel
sharding want: one parameter per projection, sliced along E.

Under expert parallelism each rank keeps the slice [lo, hi) of every stacked tensor
(`shard`), and the parameters are marked as expert parameters: their gradients are
reduced over the expert-data-parallel group only (parallel/grads.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moe_dist.models.init import normal_
from moe_dist.ops.activations import activation, hidden_multiplier
from moe_dist.ops.grouped_mm import expert_mlp, grouped_mlp, grouped_mm, scatter_grouped_mm


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "_moe_expert", False)


def _shard_param(p: nn.Parameter, lo: int, hi: int) -> nn.Parameter:
    q = nn.Parameter(p.detach()[lo:hi].clone())
    q._moe_expert = True
    q._moe_expert_offset = lo  # global id of row 0 (checkpoints key experts by global id)
    return q


def expert_stacks(model: nn.Module) -> dict[str, tuple[nn.Parameter, int]]:
    """Every stacked expert tensor [E_local, ...] by qualified name, with the global expert id
    of its row 0 (0 when not sharded). Sharded or not, row i is global expert offset + i."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, (GroupedExperts, StackedLinear)):
            for name, p in m.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = (p, getattr(p, "_moe_expert_offset", 0))
    return out


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # grouped_mm is not an autocast op: cast to the autocast dtype ourselves.
        return x.to(torch.get_autocast_dtype(device_type))
    return x


class GroupedExperts(nn.Module):
    """E expert FFNs y = W_out act(W_in x [+ b_in]) [+ b_out] (SliceMoE's experts have biases)."""

    def __init__(
        self, num_experts: int, d_model: int, d_expert: int, act: str, backend: str = "auto", bias: bool = False
    ):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.act, self.backend = act, backend
        H = d_expert * hidden_multiplier(act)
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, H))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.b_in_EH = nn.Parameter(torch.zeros(num_experts, H)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def reset_parameters(self, std_in: float, std_out: float, gain: Optional[float] = None, pooled: bool = True) -> None:
        """pooled (the fan_in scheme's output side): the fan-in is every expert's width,
        E * F, as in the MoEUT authors' sigma-MoE, whose experts are slices of one dense
        layer (the k selected outputs summed with sigmoid weights <= 1). Softmax experts,
        whose k weights sum to 1, pass False: one expert's width, F."""
        normal_(self.w_in_EDH, std_in, gain, self.d_model)
        normal_(self.w_out_EFD, std_out, gain, (self.num_experts if pooled else 1) * self.d_expert)
        if self.b_in_EH is not None:
            nn.init.zeros_(self.b_in_EH)
            nn.init.zeros_(self.b_out_ED)

    def shard(self, lo: int, hi: int) -> None:
        """Keep experts [lo, hi) of this rank."""
        for name in ("w_in_EDH", "w_out_EFD", "b_in_EH", "b_out_ED"):
            p = getattr(self, name)
            if p is not None:
                setattr(self, name, _shard_param(p, lo, hi))
        self.num_experts = hi - lo

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, row_order_N: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """row_order_N: x is not sorted by expert; sorted row n is x[row_order_N[n]], and
        the output comes back in x's order (an expert-parallel rank's received rows)."""
        x_ND = autocast_input(x_ND)
        if self.b_in_EH is None:
            return grouped_mlp(
                x_ND, self.w_in_EDH, self.w_out_EFD, tokens_per_expert_E, self.act, self.backend, row_order_N
            )
        if row_order_N is not None:  # sorted copy in, outputs back in x's order
            y_sorted = self.forward(x_ND.index_select(0, row_order_N), tokens_per_expert_E)
            return torch.empty_like(y_sorted).index_copy(0, row_order_N, y_sorted)
        h_NH = grouped_mm(x_ND, self.w_in_EDH, tokens_per_expert_E, self.backend)
        # Expert id of each row; output_size avoids a host sync.
        expert_N = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x_ND.device), tokens_per_expert_E, output_size=x_ND.shape[0]
        )
        # index_select, not b[expert_N]: deterministic gradients (see ops/__init__.py).
        h_NH = h_NH + self.b_in_EH.index_select(0, expert_N).to(h_NH.dtype)
        y_ND = grouped_mm(activation(h_NH, self.act), self.w_out_EFD, tokens_per_expert_E, self.backend)
        return y_ND + self.b_out_ED.index_select(0, expert_N).to(y_ND.dtype)

    def dispatch_and_combine(
        self, x_TD: torch.Tensor, tokens_per_expert_E: torch.Tensor, slot_N: torch.Tensor, top_k: int,
        weight_N: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """One process's whole routed FFN, y_TD = sum over a token's kept rows of
        weight * expert(x_token), as one op (ops.expert_mlp: gather, experts, weight and
        scatter fused per expert). slot_N: the kept [T, K] slots sorted by expert."""
        if self.b_in_EH is not None:
            raise NotImplementedError("dispatch_and_combine: experts with biases use forward()")
        x_TD = autocast_input(x_TD)
        return expert_mlp(
            x_TD, self.w_in_EDH, self.w_out_EFD, tokens_per_expert_E, slot_N, top_k, weight_N, self.act, self.backend
        )


class StackedLinear(nn.Module):
    """G experts of one projection: row n of expert g computes x_n @ W[g] (W: [G, I, O])."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.w_GIO = nn.Parameter(torch.empty(num_experts, d_in, d_out))

    def shard(self, lo: int, hi: int) -> None:
        self.w_GIO = _shard_param(self.w_GIO, lo, hi)

    def forward(
        self, x_NI: torch.Tensor, tokens_per_expert_G: torch.Tensor, row_order_N: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """row_order_N: as in GroupedExperts.forward (a gather and a scatter through the
        same permutation: fused on the triton backend)."""
        x_NI = autocast_input(x_NI)
        if row_order_N is not None:
            return scatter_grouped_mm(
                x_NI, self.w_GIO, tokens_per_expert_G, slot_N=row_order_N, gather_div=1, scatter_div=1,
                backend=self.backend,
            )  # fmt: skip
        return grouped_mm(x_NI, self.w_GIO, tokens_per_expert_G, self.backend)
