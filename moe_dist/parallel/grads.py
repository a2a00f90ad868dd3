"""Gradient reduction and clipping under world = dp x ep.

Every rank's loss is the mean over its own tokens, and the one-process loss on the global
batch is the mean of those. So every gradient must end as (1/world) * sum over ranks:
  - dense (replicated) parameters: all-reduce SUM over the world, divide by world;
  - expert shards: autograd through the all-to-alls has already summed the contributions of
    the ep group's tokens; all-reduce SUM over the expert-data-parallel group (the dp
    replicas of the shard), divide by world (not by dp: the ep group's sum is part of it).
The torch backend reduces dense gradients with DDP (bucketed, overlapped with the
backward) and expert shards with reduce_expert_gradients: DDP reduces every parameter over
one group, and expert shards need another. reduce_gradients does both by hand, one flat
buffer per group; the layer-parity tests use it as the reference for the rule above.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_dist.moe.experts import is_expert_param
from moe_dist.parallel.layout import ParallelLayout


def _split_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def _reduce(params: list[torch.Tensor], group, world: int) -> None:
    if not params:
        return
    grads = []
    for p in params:
        if p.grad is None:  # every rank must contribute the same buffer layout
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def reduce_expert_gradients(expert: list[torch.Tensor], layout: ParallelLayout) -> None:
    """Expert shards only (the ZeRO-3 backend's experts live outside the engine)."""
    if not layout.distributed:
        return
    if layout.dp > 1:
        _reduce(expert, layout.edp_group, layout.world_size)
    else:
        for p in expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(layout.world_size)


def reduce_replicated(params: list[torch.Tensor], layout: ParallelLayout) -> None:
    """Replicated parameters outside DDP/FSDP2 (FSDP2's ignored expert stacks at ep=1)."""
    if layout.distributed:
        _reduce(params, None, layout.world_size)


def reduce_gradients(model: torch.nn.Module, layout: ParallelLayout) -> None:
    """Turn every rank's local gradients into the one-process gradient of the global batch."""
    if not layout.distributed:
        return
    dense, expert = _split_params(model)
    _reduce(dense, None, layout.world_size)
    reduce_expert_gradients(expert, layout)


def _local(g: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of an FSDP2 DTensor, else itself."""
    return g.to_local() if hasattr(g, "to_local") else g


def clip_grad_norm(model: torch.nn.Module, layout: ParallelLayout, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the one-process gradient (dense grads counted once, or summed over
    the world when FSDP2 shards them; expert shards summed over the ep group); scale all
    gradients if it exceeds max_norm (0 = no clip)."""
    dense, expert = _split_params(model)
    grads = [p.grad for p in dense if p.grad is not None]
    # FSDP2 shards (DTensor) are summed over the world; replicated grads (DDP, or the expert
    # stacks FSDP2 ignores at ep=1) are counted once.
    sharded_g = [_local(g) for g in grads if hasattr(g, "to_local")]
    plain_g = [g for g in grads if not hasattr(g, "to_local")]
    dense_g = sharded_g + plain_g
    expert_g = [p.grad for p in expert if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    sq_sharded = torch.stack([g.float().square().sum() for g in sharded_g]).sum() if sharded_g else zero
    sq_plain = torch.stack([g.float().square().sum() for g in plain_g]).sum() if plain_g else zero
    sq_expert = torch.stack([g.float().square().sum() for g in expert_g]).sum() if expert_g else zero
    if sharded_g:
        dist.all_reduce(sq_sharded)
    sq_dense = sq_sharded + sq_plain
    if layout.ep > 1:
        dist.all_reduce(sq_expert, group=layout.ep_group)
    norm = (sq_dense + sq_expert).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in dense_g + expert_g:
            g.mul_(coef.to(g.dtype))
    return norm
