"""Checkpoints, one file per rank, written atomically.

A checkpoint is a directory checkpoints/step_00000050/ holding
    state_rank00000.pt ...  per rank: model (its expert shards), optimizer, scheduler, RNG
                            states, data-loader position, step
    config.yaml             the resolved config of the run that wrote it
    meta.json               step, layout (world, ep), sha256 and size of every other file
                            (written last, by rank 0)

Every rank writes its file into checkpoints/.tmp-step_.../ and fsyncs it; after a barrier,
rank 0 checksums the files, writes meta.json, renames the directory into place and fsyncs
the parent. A crash before the rename leaves only a .tmp- directory, which is never taken
for a checkpoint (and is removed by the next save); a directory without a valid meta.json,
or whose files do not match it, is refused by name.
A checkpoint resumes on the same layout (world size and ep); resharding to another layout
is the sharded-checkpoint issue's work and is refused here with the two layouts named.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Optional

import torch

from moe_dist.errors import CheckpointError
from moe_dist.files import sha256_file

FORMAT = 2
META, CONFIG = "meta.json", "config.yaml"


def state_file(rank: int) -> str:
    return f"state_rank{rank:05d}.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(layout) -> None:
    if layout is not None and layout.distributed:
        import torch.distributed as dist

        dist.barrier()


def save_checkpoint(
    ckpt_root: str,
    step: int,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 0,
    before_rename: Optional[Callable[[str], None]] = None,
    layout=None,
) -> str:
    """Write checkpoint `step` atomically (every rank calls this); return its directory.
    Applies keep_last retention."""
    rank = layout.rank if layout is not None else 0
    world = layout.world_size if layout is not None else 1
    final = os.path.join(ckpt_root, step_dir_name(step))
    tmp = os.path.join(ckpt_root, f".tmp-{step_dir_name(step)}")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for name in os.listdir(ckpt_root):  # leftovers of saves that crashed
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier(layout)
    own = os.path.join(tmp, state_file(rank))
    torch.save(state, own)
    _fsync_file(own)
    _barrier(layout)
    if rank == 0:
        with open(os.path.join(tmp, CONFIG), "w") as f:
            f.write(config_yaml)
        _fsync_file(os.path.join(tmp, CONFIG))
        files = {}
        for name in [state_file(r) for r in range(world)] + [CONFIG]:
            path = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        meta = {"format": FORMAT, "step": step, "world_size": world, "ep": layout.ep if layout else 1, "files": files}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if before_rename is not None:
            before_rename(tmp)  # fault-injection hook for tests
        replaced = None
        if os.path.isdir(final):  # re-saving the same step: move the old one aside first,
            replaced = os.path.join(ckpt_root, f".tmp-replaced-{step_dir_name(step)}")  # so that
            os.rename(final, replaced)  # a crash never leaves a damaged step directory
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        if keep_last > 0:
            # Keep the one just written (even when a resumed run writes an older step than
            # what the directory holds) and the newest keep_last - 1 others.
            others = [s for s in list_checkpoints(ckpt_root) if s != step]
            for old in others[: max(0, len(others) - (keep_last - 1))]:
                shutil.rmtree(os.path.join(ckpt_root, step_dir_name(old)), ignore_errors=True)
    _barrier(layout)
    return final


def list_checkpoints(ckpt_root: str) -> list[int]:
    """Steps of the checkpoint directories (complete or not) in ascending order."""
    if not os.path.isdir(ckpt_root):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(ckpt_root)) if m]
    return sorted(steps)


def verify_checkpoint(path: str, files: Optional[list[str]] = None) -> dict:
    """Return meta.json of a complete checkpoint, or raise CheckpointError naming the file.
    Checks the size of every listed file and the sha256 of `files` (default: all)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"incomplete checkpoint {path}: {META} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')}, expected {FORMAT}")
    for name, want in meta["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint file missing: {file}")
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise CheckpointError(f"truncated checkpoint file {file}: {size} bytes, expected {want['bytes']}")
        if (files is None or name in files) and sha256_file(file) != want["sha256"]:
            raise CheckpointError(f"corrupt checkpoint file {file}: sha256 differs from {META}")
    return meta


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The newest checkpoint directory, or None. A newest one that is damaged is an error,
    never skipped silently: the user decides whether to delete it."""
    steps = list_checkpoints(ckpt_root)
    if not steps:
        return None
    path = os.path.join(ckpt_root, step_dir_name(steps[-1]))
    verify_checkpoint(path, files=[CONFIG])
    return path


def load_checkpoint(path: str, rank: int = 0, world_size: int = 1, ep: int = 1) -> tuple[dict, dict[str, Any], str]:
    """(meta, this rank's state, config_yaml) of a verified checkpoint of the same layout."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    own = state_file(rank)
    meta = verify_checkpoint(path, files=[own, CONFIG])
    if (meta["world_size"], meta["ep"]) != (world_size, ep):
        raise CheckpointError(
            f"checkpoint {path} was written with world size {meta['world_size']}, ep {meta['ep']}; "
            f"this run has world size {world_size}, ep {ep}: resume on the same layout "
            "(resharding is not implemented yet)"
        )
    try:
        state = torch.load(os.path.join(path, own), map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling errors have many types
        raise CheckpointError(f"cannot read {os.path.join(path, own)}: {e}") from None
    with open(os.path.join(path, CONFIG)) as f:
        config_yaml = f.read()
    return meta, state, config_yaml
