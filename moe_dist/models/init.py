"""Weight initialisation schemes (model.init).

scaled_normal (GPT-2; the default under pre-layernorm): every matrix N(0, init_std), and
those that write into the residual stream N(0, init_std / sqrt(2L)), L the applied depth.
Pre-LN renormalises the input of every sublayer, so one small fixed std is harmless.

fan_in (the MoEUT authors' scheme; the default under peri-layernorm): every matrix of a
block N(0, g / sqrt(fan_in)) with g = sqrt(2 / L). Peri-LN never normalises the residual
path (values and FFN inputs read x itself), so under a fixed 0.02 every matmul shrinks the
signal: a 128-wide matrix of std 0.02 has gain 0.23. Measured on the 4-layer MoEUT of
docs/results.md (300 steps): under scaled_normal the loss sat at the unigram level (6.6)
from step 60 to step 240; under fan_in it was 4.97 at step 271.
Embeddings stay N(0, init_std) in both schemes. The authors' 1/sqrt(D) assumes an untied
readout; with a tied one, each token's own logit starts at sqrt(D) |e| = 11 for D = 128
(measured first loss 10.3 against 8.3 for uniform), and the run trailed the 0.02 one. An
untied readout (configs/paper/moeut_244m.yaml) keeps 0.02 too: not measured at that scale.

A module's reset_parameters(std, std_out, gain=None) takes the scaled_normal stds; with a
gain it uses fan_in instead and names each matrix's fan-in itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


def normal_(w: torch.Tensor, std: float, gain: Optional[float], fan_in: int) -> None:
    """N(0, std), or N(0, gain / sqrt(fan_in)) under the fan_in scheme (gain given)."""
    nn.init.normal_(w, std=std if gain is None else gain / math.sqrt(fan_in))
