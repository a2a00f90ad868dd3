"""Decoder-only language model whose FFN slot holds a dense FFN or an MoE FFN.

Legend: B batch, S sequence, D model dim, V vocabulary.

Pre-layernorm blocks: x + attn(ln(x)), then x + ffn(ln(x)). forward returns the logits and
the list of MoE auxiliaries (one per MoE layer); `aux_loss` sums their weighted losses.
The model is single-device code: expert parallelism comes in through the dispatcher given to
each MoE layer, never through globals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.config import Config
from moe_dist.models.attention import CausalSelfAttention
from moe_dist.models.ffn import FFN
from moe_dist.moe.layer import MoEAux, MoEFFN


@dataclass
class LMOutput:
    logits: torch.Tensor
    """[B, S, V] in the compute dtype."""
    moe: list[MoEAux] = field(default_factory=list)
    """One entry per MoE layer, in depth order."""

    @property
    def aux_loss(self) -> torch.Tensor:
        if not self.moe:
            return self.logits.new_zeros((), dtype=torch.float32)
        return torch.stack([a.loss for a in self.moe]).sum()


def is_moe_layer(cfg: Config, layer: int) -> bool:
    return cfg.model.ffn == "moe" and (layer + 1) % cfg.moe.every == 0


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        m = cfg.model
        self.ln_attn = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.attn = CausalSelfAttention(
            m.d_model, m.n_heads, cfg.data.seq_len, m.positions == "rope", m.rope_base, m.dropout
        )
        self.ln_ffn = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer)
        self.ffn = MoEFFN(m.d_model, cfg.moe, m.activation) if self.is_moe else FFN(m.d_model, m.d_ff, m.activation)
        self.drop = nn.Dropout(m.dropout)

    def forward(self, x_BSD: torch.Tensor, moe_aux: list[MoEAux]) -> torch.Tensor:
        x_BSD = x_BSD + self.drop(self.attn(self.ln_attn(x_BSD)))
        h = self.ln_ffn(x_BSD)
        if self.is_moe:
            y, aux = self.ffn(h)
            moe_aux.append(aux)
        else:
            y = self.ffn(h)
        return x_BSD + self.drop(y)


class LM(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, m.d_model)
        self.pos = nn.Embedding(cfg.data.seq_len, m.d_model) if m.positions == "learned" else None
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(m.n_layers))
        self.ln_out = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.readout = nn.Linear(m.d_model, vocab_size, bias=False)
        if m.tie_embeddings:
            self.readout.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.model.init_std
        # GPT-2: projections that write into the residual stream are scaled by 1/sqrt(2L).
        std_out = std / math.sqrt(2 * self.cfg.model.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=std)
        if not self.cfg.model.tie_embeddings:
            nn.init.normal_(self.readout.weight, std=std)
        for block in self.blocks:
            block.attn.reset_parameters(std, std_out)
            block.ffn.reset_parameters(std, std_out)

    def forward(self, idx_BS: torch.Tensor) -> LMOutput:
        B, S = idx_BS.shape
        x = self.embed(idx_BS)
        if self.pos is not None:
            x = x + self.pos(torch.arange(S, device=idx_BS.device))
        x = self.drop(x)
        moe_aux: list[MoEAux] = []
        for block in self.blocks:
            x = block(x, moe_aux)
        return LMOutput(self.readout(self.ln_out(x)), moe_aux)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32."""
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
