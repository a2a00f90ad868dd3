"""Model and optimizer state as torch.distributed.checkpoint (DCP) entries keyed so that a
checkpoint loads under another expert-parallel layout.

Keys (one flat DCP state dict; every rank passes its own, DCP plans who writes what):
    model.<fqn>                   dense parameters and buffers. Replicated ones are written
                                  once (DCP deduplicates equal keys); FSDP2 DTensors by shard.
    model.<fqn>@<g>               row g (global expert id) of a stacked expert tensor [E, ...],
                                  written by the rank that owns expert g
    optim.<fqn>.<key>             AdamW state of a dense parameter (exp_avg, exp_avg_sq, step)
    optim.<fqn>@<g>.<key>         ... of expert g
    optim_param_groups            hyper-parameters, parameters named by fqn (equal on all ranks)

DeepSpeed, which partitions optimizer state by layout, cannot reload its ZeRO state under a
different ep (its issues #5716, #6589, #8147). Here the unit is the expert, not the rank's
partition: loading asks DCP for the experts THIS rank owns under ITS layout, so a checkpoint
written at ep=4 on 4 ranks loads at ep=2 on 2 ranks or on one process, optimizer included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moe_dist.moe.experts import expert_stacks


def _split(out: dict[str, Any], key: str, t: torch.Tensor, offset: int, rows: int) -> None:
    """Row views t[i] under key@(offset+i); scalars (AdamW's step) are repeated per expert."""
    for i in range(rows):
        out[f"{key}@{offset + i}"] = t[i] if t.ndim > 0 else t


def _entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict[str, Any]]:
    """(model_sd, optim_sd, flat DCP entries). Entries are views of the state dicts' tensors,
    so a DCP load into the entries fills the state dicts in place."""
    model_sd, optim_sd = get_state_dict(model, optimizer)  # FQN-keyed; initializes AdamW state
    stacks = {name: (p.shape[0], offset) for name, (p, offset) in expert_stacks(model).items()}
    flat: dict[str, Any] = {}
    for name, t in model_sd.items():
        if name in stacks:
            _split(flat, f"model.{name}", t, stacks[name][1], stacks[name][0])
        else:
            flat[f"model.{name}"] = t
    for name, state in optim_sd["state"].items():
        for key, t in state.items():
            if name in stacks:
                rows, offset = stacks[name]
                for i in range(rows):
                    # A scalar step gets its own tensor per expert: DCP fills each separately.
                    flat[f"optim.{name}@{offset + i}.{key}"] = t[i] if t.ndim > 0 else t.clone()
            else:
                flat[f"optim.{name}.{key}"] = t
    flat["optim_param_groups"] = optim_sd["param_groups"]
    return model_sd, optim_sd, flat


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes what it owns into directory `path`."""
    _, _, flat = _entries(model, optimizer)
    dcp.save(flat, checkpoint_id=path)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load the entries this rank needs under its current layout. A key missing
    from the checkpoint (another model) is an error from DCP, never a partial load."""
    model_sd, optim_sd, flat = _entries(model, optimizer)
    dcp.load(flat, checkpoint_id=path)
    stacks = {name: (p.shape[0], offset) for name, (p, offset) in expert_stacks(model).items()}
    for name, state in optim_sd["state"].items():
        if name in stacks and "step" in state and state["step"].ndim == 0:
            state["step"].copy_(flat[f"optim.{name}@{stacks[name][1]}.step"])
    optim_sd["param_groups"] = flat["optim_param_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
