"""Decoder-only language model: the attention slot holds MHA or SwitchHead; the FFN slot a
dense FFN, a token-choice MoE (softmax or sigma-MoE sigmoid routing) or SliceMoE.

Legend: B batch, S sequence, D model dim, V vocabulary.

Norm placement (model.norm):
  pre  - x + attn(ln(x)), x + ffn(ln(x)).
  peri - MoEUT's peri-layernorm: layernorm only on the inputs of sigmoid/softmax. Q, K and
         the routers read ln(x); values and expert inputs read x itself, so the residual is
         not rescaled at every repeat. The readout reads ln(x) in both modes.
Layer grouping (model.group_size = G, MoEUT): G distinct blocks applied in the order
A B ... A B ..., n_layers / G times. Each application returns its own routing statistics;
the entropy regulariser pools them per block (moe/aux.py).

forward returns the logits and the list of routing auxiliaries in depth order. The model is
single-device code: expert parallelism comes in through the dispatchers, never globals, and
the routing noise of each depth (expert and slice dropout) as an argument of forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.config import Config
from moe_dist.models.attention import CausalSelfAttention
from moe_dist.models.ffn import FFN
from moe_dist.models.switchhead import SwitchHeadAttention
from moe_dist.moe.aux import MoEAux, total_aux_loss
from moe_dist.moe.balance import update_balance_biases
from moe_dist.moe.layer import MoEFFN
from moe_dist.moe.recompute import checkpoint_block
from moe_dist.moe.slice_layer import SliceMoEFFN
from moe_dist.parallel.expert_parallel import ExpertParallel
from moe_dist.parallel.layout import ParallelLayout


@dataclass
class LMOutput:
    logits: torch.Tensor
    """[B, S, V] in the compute dtype."""
    moe: list[MoEAux] = field(default_factory=list)
    """One entry per routed call (FFN, attention source/destination), in depth order."""

    @property
    def aux_loss(self) -> torch.Tensor:
        return total_aux_loss(self.moe).to(self.logits.device)


def is_moe_layer(cfg: Config, layer: int) -> bool:
    return cfg.model.ffn != "dense" and (layer + 1) % cfg.moe.every == 0


def head_dim(cfg: Config) -> int:
    return cfg.model.head_dim or cfg.model.d_model // cfg.model.n_heads


def build_ffn(cfg: Config, layer: int, ep: ExpertParallel) -> nn.Module:
    m = cfg.model
    if not is_moe_layer(cfg, layer):
        return FFN(m.d_model, m.d_ff, m.activation)
    if m.ffn == "slice_moe":
        return SliceMoEFFN(m.d_model, cfg.moe, m.activation, ep=ep)
    return MoEFFN(m.d_model, cfg.moe, m.activation, score="sigmoid" if m.ffn == "sigma_moe" else "softmax", ep=ep)


def build_attention(cfg: Config, ep: ExpertParallel) -> nn.Module:
    m = cfg.model
    args = (m.d_model, m.n_heads, head_dim(cfg), cfg.data.seq_len, m.positions == "rope", m.rope_base, m.dropout)
    if m.attention == "switchhead":
        # Replicated placement: every rank holds every attention expert (a local
        # ExpertParallel); sharded: the V/O experts are spread over the ep group.
        placement = ep if cfg.parallel.attention_experts == "sharded" else ExpertParallel(ep.layout, shard=False)
        return SwitchHeadAttention(*args, cfg.attention, backend=cfg.moe.grouped_mm, ep=placement)
    return CausalSelfAttention(*args)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, ep: ExpertParallel):
        super().__init__()
        m = cfg.model
        self.peri = m.norm == "peri"
        self.ln_attn = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.attn = build_attention(cfg, ep)
        self.ln_ffn = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.ffn = build_ffn(cfg, layer, ep)
        self.routed_ffn = not isinstance(self.ffn, FFN)
        self.drop = nn.Dropout(m.dropout)

    def forward(self, x_BSD: torch.Tensor, noise_2: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[MoEAux]]:
        # The auxiliaries are returned, not appended to a list argument: ZeRO-3's module
        # hooks hand a module copies of its list arguments.
        moe_aux: list[MoEAux] = []
        h = self.ln_attn(x_BSD)
        y = self.attn(x_BSD, h) if self.peri else self.attn(h, h)
        if isinstance(y, tuple):
            y, auxes = y
            moe_aux.extend(auxes)
        x_BSD = x_BSD + self.drop(y)
        h = self.ln_ffn(x_BSD)
        if self.routed_ffn:
            y, aux = self.ffn(x_BSD, h, noise_2=noise_2) if self.peri else self.ffn(h, h, noise_2=noise_2)
            moe_aux.append(aux)
        else:
            # A dense FFN has no sigmoid/softmax input: under peri-LN it reads x unnormalised.
            y = self.ffn(x_BSD if self.peri else h)
        return x_BSD + self.drop(y), moe_aux


class LM(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, layout: Optional[ParallelLayout] = None):
        super().__init__()
        m = cfg.model
        self.cfg, self.vocab_size = cfg, vocab_size
        self.ep = ExpertParallel(layout)
        self.embed = nn.Embedding(vocab_size, m.d_model)
        self.pos = nn.Embedding(cfg.data.seq_len, m.d_model) if m.positions == "learned" else None
        self.drop = nn.Dropout(m.dropout)
        n_distinct = m.group_size or m.n_layers
        self.blocks = nn.ModuleList(Block(cfg, i, self.ep) for i in range(n_distinct))
        self.layer_order = [i % n_distinct for i in range(m.n_layers)]
        self.activation_checkpoint = cfg.train.activation_checkpoint == "full"
        self.ln_out = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.readout = nn.Linear(m.d_model, vocab_size, bias=False)
        if m.tie_embeddings:
            self.readout.weight = self.embed.weight
        # Every rank initialises all experts from the same seed, then keeps its own slice:
        # the sharded model holds exactly the one-process model's weights.
        self.reset_parameters()
        for module in self.modules():
            if hasattr(module, "shard_experts"):
                module.shard_experts()

    def reset_parameters(self) -> None:
        """model.init (models/init.py). Depth L is the applied depth: a shared block writes
        into the residual stream n_layers/G times."""
        m = self.cfg.model
        L = m.n_layers
        std, std_out = m.init_std, m.init_std / math.sqrt(2 * L)
        gain = math.sqrt(2.0 / L) if m.init_scheme == "fan_in" else None
        nn.init.normal_(self.embed.weight, std=std)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=std)
        if not m.tie_embeddings:
            nn.init.normal_(self.readout.weight, std=std)
        for block in self.blocks:
            block.attn.reset_parameters(std, std_out, gain)
            block.ffn.reset_parameters(std, std_out, gain)

    def forward(self, idx_BS: torch.Tensor, noise_L2: Optional[torch.Tensor] = None) -> LMOutput:
        """noise_L2: the routing noise of each depth (moe/noise.py), from the trainer; None
        draws expert and slice dropout from torch.rand. Under train.activation_checkpoint=full
        each block application keeps only its input for the backward (moe/recompute.py)."""
        B, S = idx_BS.shape
        x = self.embed(idx_BS)
        if self.pos is not None:
            x = x + self.pos(torch.arange(S, device=idx_BS.device))
        x = self.drop(x)
        moe_aux: list[MoEAux] = []
        recompute = self.activation_checkpoint and self.training and torch.is_grad_enabled()
        for depth, i in enumerate(self.layer_order):
            args = (x, None if noise_L2 is None else noise_L2[depth])
            x, auxes = checkpoint_block(self.blocks[i], *args) if recompute else self.blocks[i](*args)
            for aux in auxes:
                aux.layer, aux.block = depth, i
            moe_aux.extend(auxes)
        return LMOutput(self.readout(self.ln_out(x)), moe_aux)

    def update_balance_biases(self) -> None:
        """Aux-loss-free balancing: move every router's selection bias (once per step)."""
        update_balance_biases(self, self.ep.sum_stats)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32."""
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
