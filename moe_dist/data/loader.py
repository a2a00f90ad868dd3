"""Streaming, resumable loader over prepared webdataset shards.

webdataset reads the tar shards; it keeps no position, so the stream is wrapped in a small
Stateful IterableDataset (epoch, windows consumed) and driven by torchdata's
StatefulDataLoader, whose state_dict collects that state from every worker. Resuming from
it continues with exactly the batch an uninterrupted run would have read next.

Splitting: the shard list of an epoch (shuffled from the seed and epoch) is split by rank,
then by worker, as webdataset's split_by_node / split_by_worker do, but from the rank and
world passed in explicitly rather than read from globals. As with those, a consumer's
epoch is its own shards: shards hold different sample counts (the last is partial) and
ranks different shard counts, so consumers start their next epochs at different steps,
and the global batches around an epoch's end repeat some windows before others are read
(measured: 2 ranks, shards of 300, 300, 300, 300 and 203 windows, 8 rows each per step:
in the 87 steps of one epoch's windows, 96 of the 1,403 came twice and 107 not at all).
data.rank_split=batch has one consumer, and exact epochs.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from moe_dist.data.prepare import FORMAT_VERSION, MANIFEST, TOKENIZER_FILE
from moe_dist.data.tokenizers import Tokenizer, load_tokenizer
from moe_dist.errors import DataError
from moe_dist.files import sha256_file


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"no prepared data: {path} does not exist (run tools/prepare_data.py)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read manifest ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: manifest format {manifest.get('format')}, expected {FORMAT_VERSION}")
    return manifest


def data_tokenizer(data_dir: str, manifest: dict) -> Tokenizer:
    return load_tokenizer(os.path.join(data_dir, TOKENIZER_FILE), manifest["tokenizer"])


def shard_paths(data_dir: str, manifest: dict, split: str, verify: bool) -> list[str]:
    """Paths of a split's shards; each must exist with the manifest's size (and sha256)."""
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        path = os.path.join(data_dir, shard["file"])
        if not os.path.isfile(path):
            raise DataError(f"missing shard {path} (listed in {os.path.join(data_dir, MANIFEST)})")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise DataError(f"corrupt shard {path}: {size} bytes, manifest says {shard['bytes']}")
        paths.append(path)
    if verify:
        errors = shard_hash_errors(data_dir, manifest, split)
        if errors:
            raise DataError(errors[0])
    return paths


def shard_hash_errors(data_dir: str, manifest: dict, split: str, rank: int = 0, world: int = 1) -> list[str]:
    """sha256 of shards rank, rank + world, ... of a split against the manifest: the
    mismatches found, each naming its file. Ranks split the hashing (every shard is read
    by one rank, not by all), because shards move between ranks every epoch, so each rank
    would otherwise hash the whole split."""
    errors = []
    for shard in manifest["splits"][split]["shards"][rank::world]:
        path = os.path.join(data_dir, shard["file"])
        if sha256_file(path) != shard["sha256"]:
            errors.append(f"corrupt shard {path}: sha256 differs from the manifest")
    return errors


def _require_enough_shards(num_shards: int, world: int, workers: int, what: str) -> None:
    """Every (rank, loader worker) reads whole shards of its own: each needs at least one."""
    if num_shards < world * workers:
        raise DataError(
            f"{what} cannot feed {world} rank(s) x {workers} worker(s): lower data.samples_per_shard "
            "(and prepare again) or data.num_workers"
        )


def _read_shard(path: str, sample_len: int, dtype: np.dtype) -> np.ndarray:
    """All samples of one shard as a [n, sample_len] array (a shard is ~0.5 MB)."""
    from webdataset.tariterators import tarfile_samples

    rows = []
    try:
        for sample in tarfile_samples([{"url": path}]):
            row = np.frombuffer(sample["tokens"], dtype=dtype)
            if row.shape[0] != sample_len:
                raise DataError(f"corrupt shard {path}: a sample has {row.shape[0]} tokens, expected {sample_len}")
            rows.append(row)
    except DataError:
        raise
    except Exception as e:  # tarfile / webdataset errors on a damaged file
        raise DataError(f"corrupt shard {path}: {type(e).__name__}: {e}") from None
    return np.stack(rows) if rows else np.zeros((0, sample_len), dtype=dtype)


class TokenStream(IterableDataset):
    """Windows of seq_len + 1 tokens from the shards assigned to this rank and worker.

    Each stored sample (manifest seq_len + 1 tokens) yields (sample_len - 1) // seq_len
    windows at stride seq_len (neighbours share one boundary token, so every prediction
    target of the sample is used once): data prepared for long sequences trains short ones.
    `loop=True` repeats epochs forever (training); `loop=False` reads one pass (eval).

    State: {"epoch", "consumed"}, the windows this worker has yielded in its current epoch.
    """

    def __init__(
        self,
        paths: list[str],
        sample_len: int,
        dtype: str,
        seq_len: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
    ):
        if seq_len + 1 > sample_len:
            raise DataError(
                f"data.seq_len={seq_len} is longer than the prepared samples "
                f"(seq_len {sample_len - 1}); prepare the data again with a larger seq_len"
            )
        self.paths, self.sample_len, self.dtype = paths, sample_len, np.dtype(dtype)
        self.seq_len, self.rank, self.world = seq_len, rank, world
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.epoch, self.consumed = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def _my_shards(self, epoch: int) -> list[int]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(range(len(self.paths)))
        if self.shuffle:
            random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
        _require_enough_shards(len(self.paths), self.world, n_workers, f"{len(self.paths)} shard(s)")
        return order[self.rank :: self.world][worker::n_workers]

    def _windows(self, epoch: int) -> Iterator[np.ndarray]:
        per_sample = (self.sample_len - 1) // self.seq_len
        for shard in self._my_shards(epoch):
            rows = _read_shard(self.paths[shard], self.sample_len, self.dtype)
            idx = np.arange(len(rows))
            if self.shuffle:
                np.random.default_rng([self.seed, epoch, shard]).shuffle(idx)
            for i in idx:
                for w in range(per_sample):
                    yield rows[i, w * self.seq_len : (w + 1) * self.seq_len + 1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            skip = self.consumed  # windows already delivered before a resume
            for n, window in enumerate(self._windows(self.epoch)):
                if n < skip:
                    continue
                self.consumed = n + 1
                yield torch.from_numpy(window.astype(np.int64))
            if not self.loop:
                return
            self.epoch, self.consumed = self.epoch + 1, 0


def build_loader(
    data_dir: str,
    manifest: dict,
    split: str,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    verify: bool = True,
    loop: bool = True,
):
    """A StatefulDataLoader of [batch_size, seq_len + 1] int64 batches."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    n = len(manifest["splits"][split]["shards"])
    _require_enough_shards(n, world, max(1, num_workers), f"{n} {split} shard(s) in {data_dir}")  # before any work

    # torchdata 0.11 calls a torch API that torch 2.13 deprecated; the call is harmless.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    dataset = TokenStream(
        shard_paths(data_dir, manifest, split, verify),
        manifest["sample_len"],
        manifest["dtype"],
        seq_len,
        rank=rank,
        world=world,
        seed=seed,
        shuffle=shuffle,
        loop=loop,
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        # Its own generator: creating an iterator must not draw from the global RNG,
        # or evaluation and resume would shift the dropout stream of training.
        generator=torch.Generator().manual_seed(seed),
    )


def val_windows(manifest: dict, seq_len: int) -> int:
    """Number of val windows of seq_len + 1 tokens (for sizing evaluation)."""
    return manifest["splits"]["val"]["samples"] * ((manifest["sample_len"] - 1) // seq_len)
