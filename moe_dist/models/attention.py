"""Causal multi-head self-attention with rotary positions.

Legend: B batch, S sequence, H heads, Dh head dim, D model dim.

forward(x, x_route=None): Q and K read x_route, V reads x. With pre-layernorm both are the
normalised input; with MoEUT's peri-layernorm only x_route (the input of the softmax) is.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.models.init import normal_


def rope_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, Dh/2] (float32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rope_pair_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope's [S, Dh] tables from rope_tables' [S, Dh/2]: (c_i, c_i) and (-s_i, s_i)
    for each pair i."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles (RoFormer), in float32.

    (x0 c - x1 s, x0 s + x1 c) = x * (c, c) + (x1, x0) * (-s, s), with rope_pair_tables'
    tables. Bit for bit apply_rope_reference (x1 * -s is -(x1 * s), and adding a negated
    term is subtracting it), in 4 ops where the pairwise form takes 7, and 3 backward where
    it takes 10: each op is a kernel launch, a small model's cost on a GPU."""
    S = x_BHSDh.shape[2]
    x = x_BHSDh.float()
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in every pair
    out = x * cos_SDh[:S].to(x.dtype) + swapped * sin_SDh[:S].to(x.dtype)
    return out.to(x_BHSDh.dtype)


def apply_rope_reference(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope pair by pair, with rope_tables' [S, Dh/2] tables (tests compare)."""
    S = x_BHSDh.shape[2]
    x1, x2 = x_BHSDh.float()[..., 0::2], x_BHSDh.float()[..., 1::2]
    c, s = cos[:S].to(x1.dtype), sin[:S].to(x1.dtype)
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.to(x_BHSDh.dtype)


class RotaryQK(nn.Module):
    """Q and K projections (dense, one per head) with rotary positions; shared by MHA and SwitchHead."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, max_seq_len: int, rope: bool, rope_base: float):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = n_heads, head_dim, rope
        self.qk = nn.Linear(d_model, 2 * n_heads * head_dim, bias=False)
        if rope:
            cos, sin = rope_pair_tables(*rope_tables(max_seq_len, head_dim, rope_base))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k), each [B, H, S, Dh]."""
        B, S, _ = x_BSD.shape
        q, k = self.qk(x_BSD).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            q = apply_rope(q, self.rope_cos, self.rope_sin)
            k = apply_rope(k, self.rope_cos, self.rope_sin)
        return q, k


class CausalSelfAttention(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, head_dim: int, max_seq_len: int, rope: bool, rope_base: float, dropout: float
    ):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qk = RotaryQK(d_model, n_heads, head_dim, max_seq_len, rope, rope_base)
        self.v = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.dropout = dropout

    def reset_parameters(self, std: float, std_out: float, gain: Optional[float] = None) -> None:
        D = self.v.weight.shape[1]
        normal_(self.qk.qk.weight, std, gain, D)
        normal_(self.v.weight, std, gain, D)
        normal_(self.out.weight, std_out, gain, self.n_heads * self.head_dim)

    def forward(self, x_BSD: torch.Tensor, x_route_BSD: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k = self.qk(x_BSD if x_route_BSD is None else x_route_BSD)
        v = self.v(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
