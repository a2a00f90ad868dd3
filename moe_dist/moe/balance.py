"""Aux-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2).

Each router keeps a bias per expert that is added to the scores used to SELECT experts,
never to the weights that scale expert outputs. After every optimizer step the bias of an
overloaded expert goes down by `rate` and that of an underloaded one up by `rate`:
    b_e += rate * sign(mean_load - load_e)
so balance is steered without a gradient that fights the language-modelling loss.

`bias` is a persistent buffer (saved in checkpoints); `load` accumulates the selections of
the training forwards since the last update (a non-persistent buffer: it is zero at every
step boundary, which is when checkpoints are written). Several rows of experts that balance
separately (SwitchHead: one set per head) are rows of a [G, E] table.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_dist.moe.recompute import recomputing


class BalanceBias(nn.Module):
    def __init__(self, num_experts: int, rate: float, groups: int = 1):
        super().__init__()
        self.rate = rate
        self.register_buffer("bias", torch.zeros(groups, num_experts))
        self.register_buffer("load", torch.zeros(groups, num_experts), persistent=False)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def live_bias(self):
        """The bias buffer itself when balancing is on (for the traffic statistics), else None."""
        return self.bias if self.enabled else None

    def observe(self, counts: torch.Tensor) -> None:
        """Add one training forward's selections: counts [G * E] of the ids group * E +
        expert (moe/dispatch.py expert_counts; the layers count once for every use). A
        checkpointed block's recompute in the backward is not a forward: not counted."""
        if self.enabled and self.training and not recomputing():
            self.load.view(-1).add_(counts.to(self.load.dtype))

    @torch.no_grad()
    def update(self, sum_over_ranks=None) -> None:
        """Move the bias toward balance; called once per optimizer step by the trainer.
        sum_over_ranks sums the loads over the global batch, so every rank (and a one-process
        run on the same batch) moves the bias identically."""
        if not self.enabled:
            return
        if sum_over_ranks is not None:
            self.load.copy_(sum_over_ranks(self.load))
        mean = self.load.mean(dim=1, keepdim=True)
        self.bias += self.rate * torch.sign(mean - self.load)
        self.load.zero_()


def update_balance_biases(model: nn.Module, sum_over_ranks=None) -> None:
    for module in model.modules():
        if isinstance(module, BalanceBias):
            module.update(sum_over_ranks)
