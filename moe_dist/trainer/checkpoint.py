"""Checkpoints: a directory per step, written by every rank in parallel, made visible atomically.

Format 3 (written by every backend):
    checkpoints/step_00000050/
        .metadata, __R_0.distcp    torch.distributed.checkpoint files: model and optimizer,
                                   every expert keyed by its global id (trainer/sharded_state.py)
        extra_rankNNNNN.pt         per rank: step, LR schedule, RNG states, data-loader position
        config.yaml                the resolved config of the run that wrote it
        meta.json                  format, step, layout (world, ep, dp, expert placement), config
                                   sha256, code version, and the sha256 and size of every file
                                   (written last, by rank 0)
Format 2 (written by earlier versions, still read): state_rankNNNNN.pt per rank instead of
    the DCP files and the extras; same layout only.

Every rank writes into checkpoints/.tmp-step_.../ and fsyncs; after a barrier rank 0
checksums the files, writes meta.json, renames the directory into place and fsyncs the
parent. A crash before the rename leaves only a .tmp- directory, which is never taken for a
checkpoint (and is removed by the next save); a directory without a valid meta.json, or
whose files do not match it, is refused by name. Re-saving a step moves the old directory
aside first; a crash between the two renames leaves it there, and train.resume=auto puts
it back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Optional

import torch

from moe_dist.errors import CheckpointError
from moe_dist.files import aside_name, sha256_file

FORMATS = (2, 3)
META, CONFIG = "meta.json", "config.yaml"


def state_file(rank: int) -> str:
    return f"state_rank{rank:05d}.pt"


def extra_file(rank: int) -> str:
    return f"extra_rank{rank:05d}.pt"


_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Files a load reads (DCP's .metadata and shards, per-rank extras and states, the config).
_LOADED = re.compile(r"^(\.metadata|.*\.distcp|extra_rank\d+\.pt|state_rank\d+\.pt|config\.yaml)$")


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


def _barrier(layout, wait: bool = False) -> None:
    """wait=True: the others wait for rank 0's checksums, which grow with the checkpoint,
    so on the layout's long-timeout wait group."""
    if layout is not None and layout.distributed:
        import torch.distributed as dist

        dist.barrier(group=layout.wait_group if wait else None)


def write_rank_file(tmp: str, name: str, obj: Any) -> None:
    path = os.path.join(tmp, name)
    torch.save(obj, path)
    _fsync_file(path)


def save_checkpoint(
    ckpt_root: str,
    step: int,
    write: Callable[[str], Any],
    config_yaml: str,
    keep_last: int = 0,
    before_rename: Optional[Callable[[str], None]] = None,
    layout=None,
    meta_extra: Optional[dict[str, Any]] = None,
    keep_every: int = 0,
) -> str:
    """Write checkpoint `step` atomically (every rank calls this; `write(tmp_dir)` writes this
    rank's files); return its directory. Retention keeps the newest keep_last (0 = all) plus
    every step divisible by keep_every (0 = none)."""
    tmp, _ = start_save(ckpt_root, step, write, layout)
    return finish_save(ckpt_root, step, tmp, config_yaml, keep_last, before_rename, layout, meta_extra, keep_every)


def start_save(ckpt_root: str, step: int, write: Callable[[str], Any], layout=None) -> tuple[str, Any]:
    """First half of a save (collective): a fresh temporary directory, then `write(tmp)`.
    Returns (tmp, whatever write returned: an asynchronous save's future)."""
    rank = layout.rank if layout is not None else 0
    tmp = os.path.join(ckpt_root, f".tmp-{step_dir_name(step)}")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for name in os.listdir(ckpt_root):  # leftovers of saves that crashed
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
        os.makedirs(tmp)
    # The default group's timeout: a peer that hangs before a save is caught here.
    _barrier(layout)
    return tmp, write(tmp)


def finish_save(
    ckpt_root: str,
    step: int,
    tmp: str,
    config_yaml: str,
    keep_last: int = 0,
    before_rename: Optional[Callable[[str], None]] = None,
    layout=None,
    meta_extra: Optional[dict[str, Any]] = None,
    keep_every: int = 0,
) -> str:
    """Second half (collective, once every rank's files are written): checksums, meta.json,
    the atomic rename, retention."""
    rank = layout.rank if layout is not None else 0
    world = layout.world_size if layout is not None else 1
    final = os.path.join(ckpt_root, step_dir_name(step))
    _barrier(layout)
    if rank == 0:
        with open(os.path.join(tmp, CONFIG), "w") as f:
            f.write(config_yaml)
        _fsync_file(os.path.join(tmp, CONFIG))
        files = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            _fsync_file(path)  # DCP syncs its data files; .metadata and the rest get synced here
            files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        meta = {"format": 2, "step": step, "world_size": world, "ep": layout.ep if layout else 1,
                **(meta_extra or {}), "files": files}
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
            # what the directory holds), the newest keep_last - 1 others, and every
            # keep_every-th step.
            others = [s for s in list_checkpoints(ckpt_root) if s != step]
            for old in others[: max(0, len(others) - (keep_last - 1))]:
                if keep_every > 0 and old % keep_every == 0:
                    continue
                shutil.rmtree(os.path.join(ckpt_root, step_dir_name(old)), ignore_errors=True)
    _barrier(layout, wait=True)
    return final


def recover_interrupted_resave(ckpt_root: str) -> list[str]:
    """Re-saving a step moves the old directory aside (.tmp-replaced-step_X) before renaming
    the new one into place. A crash between the two renames leaves step X only aside: put
    it back (rank 0, before anything lists the checkpoints). Returns the restored paths."""
    restored = []
    if not os.path.isdir(ckpt_root):
        return restored
    for name in sorted(os.listdir(ckpt_root)):
        final = os.path.join(ckpt_root, name.removeprefix(".tmp-replaced-"))
        if name.startswith(".tmp-replaced-") and _STEP_DIR.match(os.path.basename(final)) and not os.path.exists(final):
            os.rename(os.path.join(ckpt_root, name), final)
            restored.append(final)
    if restored:
        _fsync_dir(ckpt_root)
    return restored


def set_aside(path: str, why: str = "damaged") -> str:
    """Rename a checkpoint directory (or file) to <name>.<why> (or .<why>-N when taken),
    which list_checkpoints does not match: kept for inspection, never resumed or counted.
    why: "damaged", or "abandoned" for the later steps of a run rolled back."""
    aside = aside_name(path, why)
    os.rename(path, aside)
    _fsync_dir(os.path.dirname(path))
    return aside


def list_checkpoints(ckpt_root: str) -> list[int]:
    """Steps of the checkpoint directories (complete or not) in ascending order."""
    if not os.path.isdir(ckpt_root):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(ckpt_root)) if m]
    return sorted(steps)


def _refuse_a_parent(path: str) -> None:
    """A run directory or its checkpoints/ given where one step_NNNNNNNN directory belongs:
    say so, rather than call it an incomplete checkpoint."""
    for root, what in ((os.path.join(path, "checkpoints"), "a run directory"), (path, "a checkpoints directory")):
        steps = list_checkpoints(root)
        if steps:
            newest = os.path.join(root, step_dir_name(steps[-1]))
            raise CheckpointError(
                f"{path} is {what}, not a checkpoint: give one of its step directories (the newest is {newest}), "
                "or resume the run's newest with train.resume=auto and its run.dir"
            )


def verify_checkpoint(path: str, files: Optional[list[str]] = None) -> dict:
    """Return meta.json of a complete checkpoint, or raise CheckpointError naming the file.
    Checks the size of every listed file and the sha256 of `files` (default: all)."""
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not os.path.isfile(meta_path):
        _refuse_a_parent(path)
        raise CheckpointError(f"incomplete checkpoint {path}: {META} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{meta_path}: format {got}, expected one of {FORMATS}")
    for key, kind in (("step", int), ("world_size", int), ("ep", int), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{meta_path}: missing or malformed key '{key}' (expected {kind.__name__})")
    if meta["world_size"] < 1 or meta["ep"] < 1 or meta["world_size"] % meta["ep"]:
        raise CheckpointError(f"{meta_path}: world_size {meta['world_size']} and ep {meta['ep']} are no layout "
                              "(both >= 1, ep dividing world_size)")
    for name, want in meta["files"].items():
        # A name is one file of this directory (no path that leads out of it), with its size and checksum.
        if os.path.basename(name) != name or name in (".", "..") or not (
            isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)
        ):
            raise CheckpointError(f"{meta_path}: malformed entry files[{name!r}] (expected a file name in "
                                  "this directory with an int 'bytes' and a str 'sha256')")
    named = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != meta["step"]:
        raise CheckpointError(f"{meta_path}: step {meta['step']}, but the directory is {os.path.basename(path)}")
    # Every file a load reads must be listed, or it would be read unverified.
    present = os.listdir(path)
    unlisted = sorted(n for n in present if n != META and _LOADED.match(n) and n not in meta["files"])
    if unlisted:
        raise CheckpointError(f"{meta_path} does not list {', '.join(unlisted)}: refusing unverified files")
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


def read_config(path: str) -> str:
    with open(os.path.join(path, CONFIG)) as f:
        return f.read()


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling errors have many types
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _require_listed(path: str, meta: dict, names: list[str]) -> None:
    """A file this load needs must be in meta.json (verify_checkpoint only checks listed ones)."""
    for name in names:
        if name not in meta["files"]:
            raise CheckpointError(f"checkpoint file missing: {os.path.join(path, name)} (not in {META})")


def load_checkpoint(path: str, rank: int = 0, world_size: int = 1, ep: int = 1) -> tuple[dict, dict[str, Any], str]:
    """(meta, this rank's state, config_yaml) of a verified checkpoint.
    Format 2: this rank's state file; the layout must match.
    Format 3: this rank's extras (rank 0's when the world size changed); the model and
    optimizer are read from the DCP files by trainer/sharded_state.py."""
    meta = verify_checkpoint(path, files=[CONFIG])
    if meta["format"] == 2:
        own = state_file(rank)
        _require_listed(path, meta, [own])
        verify_checkpoint(path, files=[own])
        if (meta["world_size"], meta["ep"]) != (world_size, ep):
            raise CheckpointError(
                f"checkpoint {path} was written with world size {meta['world_size']}, ep {meta['ep']}; "
                f"this run has world size {world_size}, ep {ep}: a format-2 checkpoint (from an earlier version) "
                "resumes on the same layout only"
            )
        return meta, _torch_load(os.path.join(path, own)), read_config(path)
    own = extra_file(rank if meta["world_size"] == world_size else 0)
    _require_listed(path, meta, [own, ".metadata"])
    # Every DCP file and this rank's extras: a corrupt shard is refused before any load.
    verify_checkpoint(path, files=[own] + [n for n in meta["files"] if not n.startswith(("extra_", "state_"))])
    extras = _torch_load(os.path.join(path, own))
    if not isinstance(extras, dict) or extras.get("step") != meta["step"]:
        got = extras.get("step") if isinstance(extras, dict) else type(extras).__name__
        raise CheckpointError(f"{os.path.join(path, own)}: step {got}, but {META} says {meta['step']}")
    return meta, extras, read_config(path)
