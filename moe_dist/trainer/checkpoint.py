"""Single-process checkpoints, written atomically.

A checkpoint is a directory checkpoints/step_00000050/ holding
    state.pt     model, optimizer, scheduler, RNG states, data-loader position, step
    config.yaml  the resolved config of the run that wrote it
    meta.json    step, format, sha256 and size of every other file (written last)

It is written under checkpoints/.tmp-step_.../, every file fsynced, then renamed into place
and the parent directory fsynced. A crash before the rename leaves only a .tmp- directory,
which is never taken for a checkpoint (and is removed by the next save); a directory
without a valid meta.json, or whose files do not match it, is refused by name.
(The expert-parallel checkpoint issue replaces state.pt with per-rank sharded files.)
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

FORMAT = 1
STATE, META, CONFIG = "state.pt", "meta.json", "config.yaml"
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


def save_checkpoint(
    ckpt_root: str,
    step: int,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 0,
    before_rename: Optional[Callable[[str], None]] = None,
) -> str:
    """Write checkpoint `step` atomically; return its directory. Applies keep_last retention."""
    os.makedirs(ckpt_root, exist_ok=True)
    for name in os.listdir(ckpt_root):  # leftovers of saves that crashed
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    final = os.path.join(ckpt_root, step_dir_name(step))
    tmp = os.path.join(ckpt_root, f".tmp-{step_dir_name(step)}-{os.getpid()}")
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, STATE))
    with open(os.path.join(tmp, CONFIG), "w") as f:
        f.write(config_yaml)
    files = {}
    for name in (STATE, CONFIG):
        path = os.path.join(tmp, name)
        _fsync_file(path)
        files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if before_rename is not None:
        before_rename(tmp)  # fault-injection hook for tests
    if os.path.isdir(final):  # re-saving the same step (e.g. a resumed final save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    if keep_last > 0:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_root, step_dir_name(old)), ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: str) -> list[int]:
    """Steps of the checkpoint directories (complete or not) in ascending order."""
    if not os.path.isdir(ckpt_root):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(ckpt_root)) if m]
    return sorted(steps)


def verify_checkpoint(path: str) -> dict:
    """Return meta.json of a complete checkpoint, or raise CheckpointError naming the file."""
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
        if sha256_file(file) != want["sha256"]:
            raise CheckpointError(f"corrupt checkpoint file {file}: sha256 differs from {META}")
    return meta


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The newest checkpoint directory, or None. A newest one that is damaged is an error,
    never skipped silently: the user decides whether to delete it."""
    steps = list_checkpoints(ckpt_root)
    if not steps:
        return None
    path = os.path.join(ckpt_root, step_dir_name(steps[-1]))
    verify_checkpoint(path)
    return path


def load_checkpoint(path: str) -> tuple[dict, dict[str, Any], str]:
    """(meta, state, config_yaml) of a verified checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    meta = verify_checkpoint(path)
    try:
        state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling errors have many types
        raise CheckpointError(f"cannot read {os.path.join(path, STATE)}: {e}") from None
    with open(os.path.join(path, CONFIG)) as f:
        config_yaml = f.read()
    return meta, state, config_yaml
