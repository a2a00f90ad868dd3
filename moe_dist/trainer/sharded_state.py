"""Model and optimizer state as torch.distributed.checkpoint (DCP) entries keyed so that a
checkpoint loads under another expert-parallel layout.

Keys (one flat DCP state dict; every rank passes its own, DCP plans who writes what):
    model.<fqn>                   dense parameters and buffers. Replicated ones are written
                                  once (DCP deduplicates equal keys); FSDP2 DTensors by shard.
    model.<fqn>@<g>               row g (global expert id) of a stacked expert tensor [E, ...],
                                  written by the rank that owns expert g
    optim.<fqn>.<key>             AdamW state of a dense parameter (exp_avg, exp_avg_sq, step)
    optim.<fqn>@<g>.<key>         ... of expert g

No optimizer param_groups: the hyper-parameters are config keys that must match to resume,
the learning rate comes back with the schedule's state (backends.load_scheduler), and the
rest describes how THIS run steps: FSDP2 cannot take the fused AdamW that DDP uses, and
DeepSpeed adds expert groups only at ep > 1. Restored, a DDP checkpoint's `fused=True`
broke FSDP2's first step, and an ep=1 ZeRO-0 checkpoint lacked ep=2's groups.

DeepSpeed, which partitions optimizer state by layout, cannot reload its ZeRO state under a
different ep (its issues #5716, #6589, #8147). Here the unit is the expert, not the rank's
partition: loading asks DCP for the experts THIS rank owns under ITS layout, so a checkpoint
written at ep=4 on 4 ranks loads at ep=2 on 2 ranks or on one process, optimizer included.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moe_dist.moe.experts import expert_stacks


def _put(flat: dict[str, Any], key: str, suffix: str, t: torch.Tensor, offset, rows: int) -> None:
    """flat[key + suffix] = t; for a stacked expert tensor (offset = global id of row 0) one
    entry key@g + suffix per row, as a view; a scalar (AdamW's step) gets a copy per expert."""
    if offset is None:
        flat[f"{key}{suffix}"] = t
        return
    for i in range(rows):
        flat[f"{key}@{offset + i}{suffix}"] = t[i] if t.ndim > 0 else t.clone()


def _take(flat: dict[str, Any], key: str, suffix: str, offset, rows: int) -> torch.Tensor:
    """The inverse of _put: the entry, or the expert rows stacked back."""
    if offset is None:
        return flat[f"{key}{suffix}"]
    return torch.stack([flat[f"{key}@{offset + i}{suffix}"] for i in range(rows)])


def _stack_offsets(model: torch.nn.Module) -> dict[str, int]:
    return {name: offset for name, (p, offset) in expert_stacks(model).items()}


def _entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict[str, Any]]:
    """(model_sd, optim_sd, flat DCP entries). Entries are views of the state dicts' tensors,
    so a DCP load into the entries fills the state dicts in place."""
    model_sd, optim_sd = get_state_dict(model, optimizer)  # FQN-keyed; initializes AdamW state
    stacks = _stack_offsets(model)
    rows = {name: p.shape[0] for name, (p, _) in expert_stacks(model).items()}
    flat: dict[str, Any] = {}
    for name, t in model_sd.items():
        _put(flat, f"model.{name}", "", t, stacks.get(name), rows.get(name, 0))
    for name, state in optim_sd["state"].items():
        for key, t in state.items():
            _put(flat, f"optim.{name}", f".{key}", t, stacks.get(name), rows.get(name, 0))
    return model_sd, optim_sd, flat


# DCP warns at every save and load in one process that it assumes a single process is
# meant. It is: one-process runs write the format many ranks do. Filtered by its message
# for the whole process, because an async save warns from DCP's own writer thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _write(flat: dict[str, Any], path: str, async_group):
    """dcp.save, or with async_group (a process group, or True in one process) dcp.async_save:
    the tensors are copied to CPU memory now and written by a background thread; returns its
    future. The async group is separate so its collectives never interleave with training's."""
    if async_group is None:
        dcp.save(flat, checkpoint_id=path)
        return None
    pg = async_group if async_group is not True else None
    return dcp.async_save(flat, checkpoint_id=path, process_group=pg)


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, async_group=None):
    """Collective: every rank writes what it owns into directory `path`."""
    _, _, flat = _entries(model, optimizer)
    return _write(flat, path, async_group)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load the entries this rank needs under its current layout. A key missing
    from the checkpoint (another model) is an error from DCP, never a partial load."""
    model_sd, optim_sd, flat = _entries(model, optimizer)
    dcp.load(flat, checkpoint_id=path)
    stacks = _stack_offsets(model)
    for name, state in optim_sd["state"].items():
        if name in stacks and "step" in state and state["step"].ndim == 0:
            state["step"].copy_(flat[f"optim.{name}@{stacks[name]}.step"])
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


# -- DeepSpeed ZeRO-1/2/3 ----------------------------------------------------------------
# ZeRO keeps fp32 master weights and AdamW moments as flat per-rank partitions. DeepSpeed's
# safe_get/set_full_* API (deepspeed.utils) gathers and scatters them per parameter, so the
# same keys as above can be written and read: the checkpoint no longer depends on how ZeRO
# partitioned the state, and reshards like a torch-backend one. Under ZeRO-3 with ep > 1
# the expert shards live outside the engine (deepspeed_backend._Zero3Experts): plain tensors
# with their own AdamW, written under the same per-expert keys.

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _persistent_buffers(model: torch.nn.Module):
    """(name, buffer) as in model.state_dict(): non-persistent buffers (RoPE tables) left out."""
    for prefix, m in model.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), b


def _init_adam_state(adam: torch.optim.Optimizer) -> None:
    """Create AdamW's (lazily created) state with one step at lr 0 on zero gradients, so a
    checkpoint can be loaded into it before the first real step; values are overwritten."""
    if adam.state and all(adam.state[p] for g in adam.param_groups for p in g["params"]):
        return
    lrs = [g["lr"] for g in adam.param_groups]
    for g in adam.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    adam.step()
    for g, lr in zip(adam.param_groups, lrs):
        g["lr"] = lr
        for p in g["params"]:
            p.grad = None


def _zero_step(optimizer) -> torch.Tensor:
    """AdamW's step count inside ZeRO's base optimizer (equal for every flat group)."""
    return next(iter(optimizer.optimizer.state.values()))["step"]


def _ds_entries(model: torch.nn.Module, optimizer, experts, stage3: bool, full: bool) -> dict[str, Any]:
    """Flat DCP entries for a DeepSpeed ZeRO-1/2/3 engine's model, plus ZeRO-3's experts kept
    outside the engine (`experts`): gathered values when `full` (collective), else empty
    tensors of the right shapes to load into."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if stage3:
        # Stage 3 hands its fp32 partitions to the base AdamW only around a step: do the same.
        optimizer._set_fp32_optimizer_param_groups()
        _init_adam_state(optimizer.optimizer)
        optimizer._clear_fp32_optimizer_param_groups()
    else:
        _init_adam_state(optimizer.optimizer)
        # DeepSpeed links each parameter to its AdamW state once, after the FIRST param
        # group's first step, before the other groups have state (their moments are then
        # "not found"): link again now that every group has its state.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    stacks = _stack_offsets(model)  # under ZeRO-3 only ep=1's experts are in the tree
    step = _zero_step(optimizer)
    flat: dict[str, Any] = {}
    for name, p in model.named_parameters():
        shape = tuple(p.ds_shape) if stage3 else tuple(p.shape)
        rows, offset = (shape[0] if shape else 0), stacks.get(name)
        weight = safe_get_full_fp32_param(p).reshape(shape) if full else torch.empty(shape)
        _put(flat, f"model.{name}", "", weight, offset, rows)
        for key in _ADAM_KEYS:
            t = safe_get_full_optimizer_state(p, key).reshape(shape) if full else torch.empty(shape)
            _put(flat, f"optim.{name}", f".{key}", t, offset, rows)
        _put(flat, f"optim.{name}", ".step", step.clone() if full else torch.zeros_like(step), offset, rows)
    for name, b in _persistent_buffers(model):
        flat[f"model.{name}"] = b.detach().clone() if full else torch.empty_like(b)
    if experts is not None:
        _init_adam_state(experts.optimizer)
        for name, p in experts.named_params():
            offset, state = getattr(p, "_moe_expert_offset", 0), experts.optimizer.state[p]
            _put(flat, f"model.{name}", "", p.detach(), offset, p.shape[0])
            for key in (*_ADAM_KEYS, "step"):
                _put(flat, f"optim.{name}", f".{key}", state[key], offset, p.shape[0])
    return flat


def save_deepspeed(path: str, model: torch.nn.Module, optimizer, experts, stage3: bool, async_group=None):
    return _write(_ds_entries(model, optimizer, experts, stage3, full=True), path, async_group)


def load_deepspeed(path: str, model: torch.nn.Module, optimizer, experts, stage3: bool) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    flat = _ds_entries(model, optimizer, experts, stage3, full=False)
    dcp.load(flat, checkpoint_id=path)  # the experts' entries are views: filled in place
    stacks = _stack_offsets(model)
    step, values = None, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.ds_shape) if stage3 else tuple(p.shape)
            rows, offset = (shape[0] if shape else 0), stacks.get(name)
            values[name] = _take(flat, f"model.{name}", "", offset, rows)
            safe_set_full_fp32_param(p, values[name].to(p.device))  # this rank's fp32 master fragment
            for key in _ADAM_KEYS:
                safe_set_full_optimizer_state(p, _take(flat, f"optim.{name}", f".{key}", offset, rows).to(p.device), key)
            step = flat[f"optim.{name}.step" if offset is None else f"optim.{name}@{offset}.step"]
        # The module's (possibly bf16) working copies; ZeRO-3 gathers, modifies, re-partitions.
        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0) if stage3 else nullcontext()
        with gather:
            for name, p in model.named_parameters():
                p.data.copy_(values[name].to(p.dtype))
        for name, b in _persistent_buffers(model):
            b.copy_(flat[f"model.{name}"])
        for state in optimizer.optimizer.state.values():
            state["step"].copy_(step) if torch.is_tensor(state["step"]) else state.__setitem__("step", float(step))
        if experts is not None:
            for name, p in experts.named_params():
                offset = getattr(p, "_moe_expert_offset", 0)
                experts.optimizer.state[p]["step"].copy_(flat[f"optim.{name}@{offset}.step"])
