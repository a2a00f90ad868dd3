"""FFN activations shared by the dense FFN and the experts, so that both compute the same."""

import torch
import torch.nn.functional as F


def hidden_multiplier(kind: str) -> int:
    """Columns of the input projection per hidden unit: swiglu fuses gate and up (2)."""
    return 2 if kind == "swiglu" else 1


def activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """swiglu: h = [gate | up] -> silu(gate) * up; relu; gelu (tanh-free, exact erf); none
    (identity: a projection without an activation, e.g. SwitchHead's V and O)."""
    if kind == "none":
        return h
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "relu":
        return F.relu(h)
    if kind == "gelu":
        return F.gelu(h)
    raise ValueError(f"unknown activation {kind!r}")
