"""Shared fixtures: a private data cache and one tiny prepared corpus per test session."""

import importlib.util
import os
import shutil
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """tools/<name>.py as a module, registered in sys.modules (a dataclass defined in it
    looks its module up there), without running its main."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _arg(func, args, kwargs, name):
    """The value of `func`'s argument `name`, passed by position or keyword (None if not)."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else None)
    return None


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's values on the host: .item() / int() (aten's
    _local_scalar_dense), nonzero (sized by its values) and .tolist(), which on CPU reads
    memory without dispatching and is counted by patching it. On a GPU each is a sync.
    Also the ops whose output size comes from the values (a GPU syncs for them too, while
    a CPU kernel reads them unseen): repeat_interleave without output_size, bincount,
    masked_select, unique, and indexing by a boolean mask."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
    SIZED_BY_VALUES = {"bincount", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}

    def __enter__(self):
        self.reads, self._tolist = [], torch.Tensor.tolist
        torch.Tensor.tolist = lambda t: self.reads.append("tolist") or self._tolist(t)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func in self.READS or name in self.SIZED_BY_VALUES:
            self.reads.append(func.__name__)
        elif name == "repeat_interleave" and _arg(func, args, kwargs, "output_size") is None:
            self.reads.append("repeat_interleave")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        ):
            self.reads.append(f"{name}[mask]")
        return func(*args, **kwargs)
