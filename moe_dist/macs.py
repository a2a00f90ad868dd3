"""Parameter and per-token MAC counts of a config, per component.

Conventions (forward pass, multiply-accumulates per token):
- A [.., a] x [a, b] matmul costs a*b MACs per row. Norms, activations, softmax, the
  embedding lookup and RoPE are not counted (they are not matmuls).
- Attention scores and the weighted sum of values cost 2 * H * Dh * T per token at context
  T (every key counted; a causal kernel skips about half).
- Routed layers count what one token actually computes: the router and k experts of E.
  SliceMoE: every slice routes on its own, S * k expert calls of width D/S per token.
- Active parameters: those a token touches. A SliceMoE token touches at most min(E, S*k)
  distinct experts; that upper bound is reported.
Totals cover the applied depth: a MoEUT block shared by n_layers/G repeats is counted
once in parameters and n_layers/G times in MACs.
tests/test_macs.py checks these formulas against torch's FlopCounterMode on real models.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from moe_dist.config import Config
from moe_dist.ops.activations import hidden_multiplier


@dataclass
class Counts:
    params_total: int
    params_active: int
    macs: "OrderedDict[str, int]"
    """Per token, per component: attention_proj, attention_scores, attention_gates (SwitchHead's
    source and destination gates), router (FFN routers), ffn, readout."""
    attention_matrix: int
    """Attention-matrix elements per sequence per layer (H * T * T): SwitchHead's memory claim."""

    @property
    def macs_total(self) -> int:
        return sum(self.macs.values())

    @property
    def macs_attention(self) -> int:
        """Everything attention computes per token: projections, scores, SwitchHead gates."""
        return self.macs["attention_proj"] + self.macs["attention_scores"] + self.macs["attention_gates"]


def vocab_size(cfg: Config) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    return {"bpe": cfg.data.vocab_size, "gpt2": 50257, "bytes": 257}[cfg.data.tokenizer]


def _ffn_params(d_in: int, hidden: int, act: str, bias: bool = False) -> int:
    mult = hidden_multiplier(act)
    return d_in * hidden * mult + hidden * d_in + ((hidden * mult + d_in) if bias else 0)


def count(cfg: Config, context: int | None = None) -> Counts:
    """Counts for `cfg` at context length `context` (default data.seq_len)."""
    m, moe, att = cfg.model, cfg.moe, cfg.attention
    T = context or cfg.data.seq_len
    D, H = m.d_model, m.n_heads
    Dh = m.head_dim or D // H
    V = vocab_size(cfg)
    distinct = m.group_size or m.n_layers
    repeats = m.n_layers // distinct
    macs = OrderedDict((k, 0) for k in ("attention_proj", "attention_scores", "attention_gates", "router", "ffn", "readout"))
    total = active = 0

    # Embedding, readout and final norm.
    total += V * D + (0 if m.tie_embeddings else V * D) + 2 * D
    if m.positions == "learned":
        total += cfg.data.seq_len * D
    active += total
    macs["readout"] = D * V

    from moe_dist.models.transformer import is_moe_layer

    for layer in range(distinct):
        # Attention.
        norms = 4 * D  # two LayerNorms per block (weight + bias)
        total += norms
        active += norms
        qk = 2 * D * H * Dh
        if m.attention == "switchhead":
            E, k = att.num_experts, att.top_k
            gates = 2 * D * H * E
            experts = 2 * H * E * D * Dh  # V and O, E experts per head
            total += qk + gates + experts
            active += qk + gates + experts * k // E
            macs["attention_proj"] += repeats * (qk + 2 * H * k * D * Dh)
            macs["attention_gates"] += repeats * gates
        else:
            total += qk + 2 * D * H * Dh
            active += qk + 2 * D * H * Dh
            macs["attention_proj"] += repeats * (qk + 2 * D * H * Dh)
        macs["attention_scores"] += repeats * 2 * H * Dh * T

        # FFN.
        if not is_moe_layer(cfg, layer):
            p = _ffn_params(D, m.d_ff, m.activation)
            total, active = total + p, active + p
            macs["ffn"] += repeats * p
            continue
        E, k = moe.num_experts, moe.top_k
        if m.ffn == "slice_moe":
            S, Ds, Hr = moe.num_slices, D // moe.num_slices, moe.slice_router_hidden
            router = Ds * Hr + Hr + Hr * E + E
            expert = _ffn_params(Ds, moe.d_expert, m.activation, bias=True)
            total += router + E * expert
            active += router + min(E, S * k) * expert
            macs["router"] += repeats * S * (Ds * Hr + Hr * E)
            macs["ffn"] += repeats * S * k * _ffn_params(Ds, moe.d_expert, m.activation)
            continue
        router = D * E
        expert = _ffn_params(D, moe.d_expert, m.activation)
        shared = _ffn_params(D, moe.num_shared_experts * moe.d_expert, m.activation) if moe.num_shared_experts else 0
        total += router + E * expert + shared
        active += router + k * expert + shared
        macs["router"] += repeats * router
        macs["ffn"] += repeats * (k * expert + shared)
    return Counts(total, active, macs, H * T * T)


def format_counts(c: Counts, cfg: Config, context: int | None = None) -> str:
    T = context or cfg.data.seq_len
    lines = [
        f"parameters: total {c.params_total:,} ({c.params_total / 1e6:.1f}M), "
        f"active per token {c.params_active:,} ({c.params_active / 1e6:.1f}M)",
        f"MACs per token at context {T} (forward):",
    ]
    for name, value in c.macs.items():
        lines.append(f"  {name:<17} {value:>15,}  ({value / 1e6:8.2f}M)")
    lines.append(f"  {'total':<17} {c.macs_total:>15,}  ({c.macs_total / 1e6:8.2f}M)")
    lines.append(f"attention-matrix elements per sequence per layer (H*T*T): {c.attention_matrix:,}")
    return "\n".join(lines)
