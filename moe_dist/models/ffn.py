"""Dense FFN with the same activation and weight layout as one expert.

w_in: Linear(D -> H) with H = d_ff * hidden_multiplier (swiglu: [gate | up]);
w_out: Linear(d_ff -> D). An expert's w_in_EDH[e] equals w_in.weight.T, so a one-expert
top-1 MoE loaded with these weights computes exactly this FFN (tests check it).
"""

from typing import Optional

import torch
import torch.nn as nn

from moe_dist.models.init import normal_
from moe_dist.ops.activations import activation, hidden_multiplier


class FFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, act: str):
        super().__init__()
        self.act = act
        self.w_in = nn.Linear(d_model, d_ff * hidden_multiplier(act), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def reset_parameters(self, std: float, std_out: float, gain: Optional[float] = None) -> None:
        normal_(self.w_in.weight, std, gain, self.w_in.weight.shape[1])
        normal_(self.w_out.weight, std_out, gain, self.w_out.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activation(self.w_in(x), self.act))
