"""Training backends: what turns a loss into an optimizer step.

The trainer owns the model, data, metrics and checkpoint files; a backend owns the optimizer,
the LR schedule and gradient communication, behind one small interface:

    backend.module            the module to call for forward (DDP, a DeepSpeed engine, or the model)
    with backend.micro_batch(last):   around one micro-batch's forward and backward
    backend.backward(loss)    one micro-batch (the backend scales by 1 / grad_accum_steps)
    backend.step() -> norm    reduce, clip, optimizer and scheduler step, zero the grads;
                              returns the global gradient norm before clipping
    backend.lr                learning rate of the step about to be taken
    backend.save_sharded(path) / load_sharded(path)   model + optimizer (trainer/sharded_state.py)

`torch` (here) reduces dense gradients with DDP and expert gradients by hand (parallel/grads.py); `deepspeed`
(trainer/deepspeed_backend.py, the only module that imports DeepSpeed) hands the same model
and the same AdamW hyper-parameters to a DeepSpeed engine.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch

from moe_dist.config import Config
from moe_dist.moe.experts import expert_stacks, is_expert_param
from moe_dist.parallel.grads import clip_grad_norm, reduce_expert_gradients, reduce_replicated
from moe_dist.parallel.layout import ParallelLayout
from moe_dist.trainer import sharded_state
from moe_dist.trainer.schedule import lr_factor


def _decays(name: str, p: torch.Tensor) -> bool:
    """A matrix, not an embedding, and not a bias: stacked expert biases ([E, H], named b_*,
    moe/experts.py) have two dims but are biases all the same."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim >= 2 and "embed" not in name and "pos." not in name and not leaf.startswith("b_")


def param_groups(params, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; norms, biases and embeddings (tied readout included) do not.
    `params` are (name, parameter) pairs."""
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.AdamW:
    """torch's fused AdamW where every parameter allows it (floating, on CPU or CUDA, plain
    tensors): one kernel per tensor group, where the default loops over tensors a few ops
    at a time. On the quickstart model (43 tensors, 3.9M parameters, 2-core CPU) a step
    took 2.2 ms against 13.7 ms (10.7 ms foreach); on a GPU it saves launches. FSDP2 keeps
    the default: its DTensor parameters sit in groups with our plain expert tensors, which
    the fused kernel refuses ("got mixed torch.Tensor and DTensor")."""
    o = cfg.optim
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, cfg.train.max_steps))


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    """LRScheduler.load_state_dict restores the schedule's position but not the optimizer's
    current lr, which only the next scheduler.step() would set: set it here."""
    n = len(scheduler.optimizer.param_groups)
    if len(state["base_lrs"]) != n:
        # A resharded run may group parameters differently (DeepSpeed's expert groups exist
        # only under ep > 1); every group follows one schedule, so the lists just resize.
        if len(set(state["base_lrs"])) != 1:
            raise ValueError(f"scheduler state has {len(state['base_lrs'])} different group lrs, this optimizer {n} groups")
        state = dict(state)
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if key in state:
                state[key] = [state[key][0]] * n
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


class TorchBackend:
    """AdamW on every rank. Dense gradients: DDP (bucketed all-reduce overlapped with the
    backward, averaged over the world). Expert shards: excluded from DDP, which reduces every
    parameter over one group, and reduced by parallel/grads.py over their expert-data-parallel
    group with the same 1/world scale."""

    def __init__(self, model: torch.nn.Module, cfg: Config, layout: ParallelLayout, device: torch.device):
        self.model, self.cfg, self.layout = model, cfg, layout
        self.module = model
        self.expert_params = [p for p in model.parameters() if is_expert_param(p)]
        if layout.distributed and cfg.train.fsdp:
            self._fully_shard(model, device)
        elif layout.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            experts = [n for n, p in model.named_parameters() if is_expert_param(p)]
            DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
            # No buffer broadcast per forward: the buffers (routing biases, RoPE tables) are
            # equal on every rank by construction. torch 2.13 renamed the flag (and warns at
            # the old name); the GPU machines' torch 2.11 knows only the old one. The new flag
            # still broadcasts the buffers once, here: harmless, they are equal, and a
            # checkpoint loads after this.
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
            self.module = DDP(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                **{no_sync: False},
            )
        self.optimizer = build_adamw(param_groups(model.named_parameters(), cfg.optim.weight_decay), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.summary = self._summary() if layout.distributed else None

    def _summary(self) -> str:
        """One line for the log: how the dense parameters are held on this rank."""
        L = self.layout
        dense = [p for p in self.model.parameters() if not is_expert_param(p)]
        if self.fsdp:
            # Expert stacks at ep=1 are FSDP2-ignored and replicated: counted whole here.
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in dense)
            text = f"torch: FSDP2 over {L.world_size} ranks; dense parameters sharded: {local} of "
            text += f"{sum(p.numel() for p in dense)} elements on rank {L.rank}"
        else:
            text = f"torch: DDP over {L.world_size} ranks; dense parameters replicated"
        if self.expert_params:
            text += f"; expert shard of {sum(p.numel() for p in self.expert_params)} elements (ep={L.ep})"
        return text

    def _fully_shard(self, model: torch.nn.Module, device: torch.device) -> None:
        """FSDP2 over the whole world: one unit per distinct block, then the root (embeddings,
        final norm, readout). Expert shards are ignored_params: they are already sharded by
        expert parallelism, and their gradients belong to the expert-data-parallel group."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (self.layout.world_size,))
        # Every stacked expert tensor stays whole, sharded or not (ep=1), so checkpoints key
        # experts by global id under any backend; unsharded ones are all-reduced in step().
        stacks = [p for p, _ in expert_stacks(model).values()]
        ignored = set(stacks)
        # In module order, never set order: every rank must flatten the same list to all-reduce it.
        self.replicated_stacks = [p for p in stacks if not is_expert_param(p)]
        for block in model.blocks:
            fully_shard(block, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        self.fsdp = True

    fsdp = False
    replicated_stacks: list = []

    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward: reduce on the last only."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        if self.module is not self.model and not last:
            return self.module.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum_steps).backward()

    def step(self) -> torch.Tensor:
        # Dense gradients were averaged by DDP (or reduce-scattered by FSDP2) in the last backward.
        reduce_expert_gradients(self.expert_params, self.layout)
        if self.replicated_stacks:
            reduce_replicated(self.replicated_stacks, self.layout)
        norm = clip_grad_norm(self.model, self.layout, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # Checkpoints (trainer/sharded_state.py): collective over every rank.
    def save_sharded(self, path: str, async_group=None):
        return sharded_state.save(path, self.model, self.optimizer, async_group)

    def load_sharded(self, path: str) -> None:
        sharded_state.load(path, self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A format-2 checkpoint (one pickle per rank, written before the sharded format)."""
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_backend(model: torch.nn.Module, cfg: Config, layout: ParallelLayout, device: torch.device, ds_config=None):
    if cfg.train.backend == "deepspeed":
        from moe_dist.trainer.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, layout, device, ds_config)
    return TorchBackend(model, cfg, layout, device)
