"""Training backends: what turns a loss into an optimizer step.

The trainer owns the model, data, metrics and checkpoint files; a backend owns the optimizer,
the LR schedule and gradient communication, behind one small interface:

    backend.module            the module to call for forward (a DeepSpeed engine or the model)
    backend.backward(loss)    one micro-batch (the backend scales by 1 / grad_accum_steps)
    backend.step() -> norm    reduce, clip, optimizer and scheduler step, zero the grads;
                              returns the global gradient norm before clipping
    backend.lr                learning rate of the step about to be taken
    backend.state_dict() / load_state_dict(state)   model + optimizer + scheduler

`torch` (here) reduces gradients by hand over dp x ep (parallel/grads.py); `deepspeed`
(trainer/deepspeed_backend.py, the only module that imports DeepSpeed) hands the same model
and the same AdamW hyper-parameters to a DeepSpeed engine.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.config import Config
from moe_dist.parallel.grads import clip_grad_norm, reduce_gradients
from moe_dist.parallel.layout import ParallelLayout
from moe_dist.trainer.schedule import lr_factor


def param_groups(params, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; norms, biases and embeddings (tied readout included) do not.
    `params` are (name, parameter) pairs."""
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name and "pos." not in name else no_decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, cfg.train.max_steps))


class TorchBackend:
    """AdamW on every rank, gradients reduced by parallel/grads.py (dense over the world,
    experts over their expert-data-parallel group, both scaled by 1/world)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, layout: ParallelLayout):
        self.model, self.cfg, self.layout = model, cfg, layout
        self.module = model
        self.optimizer = build_adamw(param_groups(model.named_parameters(), cfg.optim.weight_decay), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum_steps).backward()

    def step(self) -> torch.Tensor:
        reduce_gradients(self.model, self.layout)
        norm = clip_grad_norm(self.model, self.layout, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_backend(model: torch.nn.Module, cfg: Config, layout: ParallelLayout, device: torch.device, ds_config=None):
    if cfg.train.backend == "deepspeed":
        from moe_dist.trainer.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, layout, device, ds_config)
    return TorchBackend(model, cfg, layout)
